"""The panel's credentials: Gradio's own login (auth=) from --auth USER:PASS, --auth-file FILE or the
EMOLORA_PANEL_AUTH environment variable. A panel listening beyond loopback refuses to start without them: it can
start training on the server's files and hands out the LoRA files it made."""

import os
from pathlib import Path

ENV = "EMOLORA_PANEL_AUTH"
HOW = (f"give credentials with --auth USER:PASS, --auth-file FILE (one user:pass a line) or the environment "
       f"variable {ENV}=user:pass")


class AuthError(ValueError):
    """Unusable credentials: the message names the source and the line."""


def parse(text: str, source: str) -> list[tuple[str, str]]:
    """user:pass pairs, one a line (blank lines and # comments skipped); the password may hold ':'."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise AuthError(f"{source}, line {n}: expected user:pass")
        out.append((user.strip(), password))
    return out


def credentials(pairs=(), file=None, env=None) -> list[tuple[str, str]]:
    """All credentials given: --auth values, the file's lines and the environment variable's."""
    out = []
    for i, p in enumerate(pairs or ()):
        out += parse(p, f"--auth #{i + 1}")
    if file:
        path = Path(file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise AuthError(f"cannot read the auth file {path}: {e}") from None
        found = parse(text, str(path))
        if not found:
            raise AuthError(f"the auth file {path} holds no user:pass line")
        out += found
    env = os.environ.get(ENV) if env is None else env
    if env:
        out += parse(env, ENV)
    return out
