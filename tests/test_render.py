"""Reply templates: the shipped defaults, an operator's own folder, strictness and escaping."""

from __future__ import annotations

from pathlib import Path

import pytest

from billing_responder.errors import ConfigError
from billing_responder.render import ReplyContext, ReplyRenderer, default_templates_dir
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox

CONTEXT = ReplyContext(
    customer_name="Ada <b>Lovelace</b> & Co",
    portal_url="https://billing.stripe.com/p/session/test_x?a=1&b=2",
    original_subject='Invoice "<script>alert(1)</script>"',
    signature="The support team",
)


def use_templates(sandbox: Sandbox, text: str, html: str) -> None:
    """Point the sandbox config's [reply] templates_dir at a folder with these two templates."""
    folder = sandbox.folder / "mytemplates"
    folder.mkdir()
    (folder / "reply.txt.j2").write_text(text)
    (folder / "reply.html.j2").write_text(html)
    config = sandbox.config_path.read_text()
    sandbox.config_path.write_text(
        config.replace("[reply]\n", '[reply]\ntemplates_dir = "mytemplates"\n'))


class TestDefaults:
    def test_default_templates_render_every_variable(self) -> None:
        """Both shipped templates use the link, the name, the subject and the signature."""
        rendered = ReplyRenderer(None).render(CONTEXT)
        for part in (rendered.text, rendered.html):
            assert "Lovelace" in part and "The support team" in part
        assert CONTEXT.portal_url in rendered.text
        assert "https://billing.stripe.com/p/session/test_x?a=1&amp;b=2" in rendered.html

    def test_html_part_escapes_what_came_from_the_mail_and_the_text_part_does_not(self) -> None:
        """Subject and name are autoescaped in HTML (no markup injection), verbatim in text."""
        rendered = ReplyRenderer(None).render(CONTEXT)
        assert "<script>" not in rendered.html and "&lt;script&gt;" in rendered.html
        assert "<b>Lovelace</b>" not in rendered.html
        assert '"<script>alert(1)</script>"' in rendered.text

    def test_default_folder_holds_both_templates(self) -> None:
        """The default templates folder (packaged or checkout) has the text and HTML templates."""
        folder = default_templates_dir()
        assert (folder / "reply.txt.j2").is_file() and (folder / "reply.html.j2").is_file()


class TestOperatorTemplates:
    def test_undefined_variable_is_a_config_error_naming_the_key(self, tmp_path: Path) -> None:
        """A template using an unknown variable fails loudly, naming reply.templates_dir."""
        (tmp_path / "reply.txt.j2").write_text("Hi {{ first_name }}\n")
        (tmp_path / "reply.html.j2").write_text("<p>Hi</p>\n")
        with pytest.raises(ConfigError) as caught:
            ReplyRenderer(tmp_path).check()
        assert caught.value.key == "reply.templates_dir"
        assert "first_name" in str(caught.value)

    def test_operator_folder_is_used_for_real_replies(self, sandbox: Sandbox) -> None:
        """With [reply] templates_dir, the reply Gmail receives is rendered from those files."""
        use_templates(sandbox, "Custom hello {{ customer_name }}: {{ portal_url }}\n",
                      "<p>Custom {{ customer_name }}</p>\n")
        sandbox.stripe.add_customer("ada@example.com", name="Ada")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        assert sandbox.cli("once").code == 0
        reply = sandbox.gmail.sent_messages()[0].message
        body = reply.get_body(preferencelist=("plain",))
        assert body is not None
        assert body.get_content().startswith("Custom hello Ada: ")  # type: ignore[attr-defined]

    def test_broken_operator_template_stops_once_with_exit_2_before_any_write(
        self, sandbox: Sandbox
    ) -> None:
        """A template syntax error is found at start: exit 2 naming the key, nothing sent."""
        use_templates(sandbox, "Hi {% if %}\n", "<p>Hi</p>\n")
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        result = sandbox.cli("once")
        assert result.code == 2
        assert "reply.templates_dir" in result.stderr
        assert sandbox.gmail.writes() == [] and sandbox.stripe.writes() == []
