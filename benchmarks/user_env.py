"""The environment of a measured process: the user's, without this machine's own settings."""

from __future__ import annotations

import os

#: Set on the machine these benchmarks ran on, never by ``pip``: every process then compiles the
#: library (an editable install) from source again, ~55 ms of the training process's start-up and as
#: much in each helper, where a user's first import writes the bytecode for every later one.
_NOT_A_USERS = ("PYTHONDONTWRITEBYTECODE",)


def user_env(drop_prefixes: tuple[str, ...] = (), **settings: str) -> dict[str, str]:
    """This process's environment without variables starting with ``drop_prefixes`` and those no
    user sets, plus ``settings``."""
    env = {key: value for key, value in os.environ.items()
           if key not in _NOT_A_USERS and not key.startswith(drop_prefixes)}
    return {**env, **settings}
