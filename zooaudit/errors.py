"""User-facing errors.

Every error raised for bad input is a :class:`ZooauditError` whose message is one
paragraph naming the bad value and what is allowed; the CLI prints it and exits
non-zero without a traceback.
"""


class ZooauditError(Exception):
    """Bad input or an unusable configuration, explained for the user."""


def unknown(kind: str, value: object, allowed, hint: str = "") -> ZooauditError:
    """Build the standard "unknown X" error listing the allowed values."""
    allowed = sorted(str(a) for a in allowed)
    shown = ", ".join(allowed[:40]) + (" …" if len(allowed) > 40 else "")
    msg = f"Unknown {kind} {value!r}. Allowed: {shown or '(none)'}."
    if hint:
        msg += " " + hint
    return ZooauditError(msg)


def problems(err: Exception) -> str:
    """A spec's validation error as one line: ``field.path: reason`` per problem, joined by ``;``
    (pydantic's message says what is allowed, e.g. "Input should be greater than or equal to 1");
    any other error: its message. Shared by the CLI and the nightly schedules file."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
    return str(err)
