"""Rendering the reply from the Jinja templates operators can edit.

Two templates, ``reply.txt.j2`` and ``reply.html.j2``, from ``[reply] templates_dir`` when set,
else the defaults shipped inside the package (the checkout's ``templates/`` folder when running
from source). Undefined variables are errors (``StrictUndefined``) and HTML is autoescaped, so a
customer name or subject can neither vanish silently nor inject markup.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from billing_responder.errors import ConfigError

TEXT_TEMPLATE = "reply.txt.j2"
HTML_TEMPLATE = "reply.html.j2"


@dataclass(frozen=True)
class ReplyContext:
    """The variables a template may use."""

    customer_name: str
    portal_url: str
    original_subject: str
    signature: str


@dataclass(frozen=True)
class RenderedReply:
    """Both parts of a rendered reply."""

    text: str
    html: str


def default_templates_dir() -> Path:
    """The templates that ship with billing-responder."""
    packaged = Path(str(resources.files("billing_responder") / "templates"))
    if (packaged / TEXT_TEMPLATE).is_file():
        return packaged
    # Running from a source checkout: the templates live at its top level.
    return Path(__file__).resolve().parent.parent / "templates"


class ReplyRenderer:
    """Renders replies from one templates folder."""

    def __init__(self, templates_dir: Path | None, *, config_path: str = "config.toml") -> None:
        self.templates_dir = templates_dir or default_templates_dir()
        self._config_path = config_path
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.templates_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html", "html.j2"), default_for_string=False
            ),
            keep_trailing_newline=True,
        )

    def render(self, context: ReplyContext) -> RenderedReply:
        """Both parts of the reply; a template problem is a config error naming the folder."""
        values = {
            "customer_name": context.customer_name,
            "portal_url": context.portal_url,
            "original_subject": context.original_subject,
            "signature": context.signature,
        }
        try:
            text = self._env.get_template(TEXT_TEMPLATE).render(values)
            html = self._env.get_template(HTML_TEMPLATE).render(values)
        except jinja2.TemplateError as exc:
            where = getattr(exc, "filename", None) or self.templates_dir
            raise ConfigError(
                self._config_path, "reply.templates_dir", f"template {where}: {exc}"
            ) from None
        return RenderedReply(text=text, html=html)

    def check(self) -> None:
        """Render once with sample values, so a broken template stops the start, not a reply."""
        self.render(
            ReplyContext(
                customer_name="Ada Lovelace",
                portal_url="https://billing.stripe.com/p/session/test_sample",
                original_subject="Where is my invoice?",
                signature="The support team",
            )
        )
