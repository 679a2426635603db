"""Errors raised by mpsearch. Every message follows one template: "<what is wrong>; <how to fix it>"."""

from __future__ import annotations


class MpsearchError(ValueError):
    """Base class: bad input the user can fix. The CLI prints it on one line and exits with code 2."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what}; {fix}" if fix else what)


class InvalidOptionError(MpsearchError):
    """An option name that does not parse (see ``mpsearch.core.options``)."""


class InvalidTableError(MpsearchError):
    """A CostTable that breaks the schema (duplicate rows, NaN damage, negative costs...)."""


class InvalidPlanError(MpsearchError):
    """A BitPlan that is corrupt or does not match the model/table it is used with."""


class InfeasibleBudgetError(MpsearchError):
    """No plan with the given options meets the budget."""


class UnknownModelError(MpsearchError):
    """A model name that is not in the zoo."""


def redact(text: str) -> str:
    """``text`` with the password of every storage URL in it replaced by ``***``: ``scheme://user:password@host``
    (also a password holding ``/`` or spaces: up to the first ``@`` on its line) and ``?password=...`` query
    arguments. Storage URLs land in plan provenance, logs and messages, which users share."""
    import re

    text = re.sub(r"(://[^:/@\s]*):[^@\n]*?@", r"\1:***@", text)
    return re.sub(r"([?&](?:password|passwd|pwd)=)[^&\s]*", r"\1***", text, flags=re.IGNORECASE)
