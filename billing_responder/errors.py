"""Every error billing-responder raises on purpose, in one tree.

    BillingResponderError
    ├── ConfigError            bad config file or key; exit 2 (names the file and the key)
    ├── UsageError             bad command-line usage or input file; exit 2
    ├── FatalServiceError      a service refuses us, so no cycle can run (bad Stripe key); exit 1
    │   ├── GmailAuthError     the Gmail credentials are missing, expired or revoked; exit 1
    │   ├── StateError         the state database cannot be opened or written; exit 1
    │   └── ServiceUnavailableError  a service is unreachable after retries: `once` exits 1,
    │                          the daemon logs it and tries again at the next interval
    ├── TransientServiceError  one message could not be processed now (rate limit, 5xx, timeout);
    │   │                      the message stays unanswered and unmarked for the next cycle
    │   ├── IdempotencyConflictError  Stripe saw this idempotency key with other parameters
    │   └── MessageGoneError   Gmail has no message with this id (404): deleted meanwhile
    └── HistoryExpiredError    Gmail no longer keeps history from the stored history id (404);
                               the responder falls back to a full search sync, nothing is lost

The CLI is the only place that turns these into messages and exit codes; the library raises them
with enough context to say what happened and what to do.
"""

from __future__ import annotations


class BillingResponderError(Exception):
    """Base of every error billing-responder raises on purpose."""


class ConfigError(BillingResponderError):
    """The configuration file is missing, unreadable or has a bad key."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


class UsageError(BillingResponderError):
    """The command was called wrongly, or an input file cannot be used."""


class FatalServiceError(BillingResponderError):
    """A service refuses us in a way no retry fixes; the whole run must stop."""

    def __init__(self, service: str, message: str) -> None:
        self.service = service
        super().__init__(f"{service}: {message}")


class GmailAuthError(FatalServiceError):
    """Gmail credentials are missing, expired or revoked."""

    def __init__(self, message: str) -> None:
        super().__init__("Gmail", message)


class StateError(FatalServiceError):
    """The ledger cannot be opened or written (a locked database, a full disk, a bad path)."""

    def __init__(self, message: str) -> None:
        super().__init__("state database", message)


class ServiceUnavailableError(FatalServiceError):
    """A service did not answer usefully even after retries; a later cycle may do better."""


class TransientServiceError(BillingResponderError):
    """A call failed in a way a later cycle may not; the message is left for the next cycle."""

    def __init__(self, service: str, message: str) -> None:
        self.service = service
        super().__init__(f"{service}: {message}")


class IdempotencyConflictError(TransientServiceError):
    """An idempotency key was first used with other parameters (e.g. another customer record)."""

    def __init__(self, message: str) -> None:
        super().__init__("Stripe", message)


class MessageGoneError(TransientServiceError):
    """Gmail answered 404 for a message: it was deleted (or never existed) meanwhile."""

    def __init__(self, message: str) -> None:
        super().__init__("Gmail", message)


class HistoryExpiredError(BillingResponderError):
    """Gmail answered 404 for a ``startHistoryId``: its history no longer reaches back that far.

    Gmail keeps history for about a week (sometimes only hours); the caller must list the
    mailbox afresh instead.
    """

    def __init__(self, history_id: int) -> None:
        self.history_id = history_id
        super().__init__(f"Gmail: history from id {history_id} has expired (404)")
