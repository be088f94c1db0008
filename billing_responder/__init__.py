"""billing-responder: answer billing emails with a link to the sender's Stripe Billing Portal."""

__version__ = "0.1.0"
