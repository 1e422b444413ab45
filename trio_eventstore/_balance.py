"""Spreading subscriptions over processes, as pure functions (no I/O).

Balanced holding (``balance_subscriptions=True``): the stores that run the same set of
subscriptions find each other in ``pg_stat_activity``, where each one's lock connection
names itself ``trio-eventstore balance <set> <member> <schema>`` (`application_name`):
``<set>`` is a fingerprint of the store's subscription locks (`set_fingerprint`), so only
stores that run the very same set count each other, and ``<member>`` is the store's random
id. Each store then holds at most its fair share, ``ceil(subscriptions / members)``
(`fair_share`): one holding more hands the surplus over (`excess`, `surplus`), one holding
less tries free locks (`preferred`); and while a store holds less than
``subscriptions // members``, those holding more hand one over each (`excess`). Which ones
move is decided by rendezvous hashing of the lock x the member (`score`), so stores agree
without talking.

Partition groups: `group_of` sends a partition key to one of a fixed number of groups with
a hash that is the same in every process (never Python's salted ``hash()``); each group is
its own subscription row, named by `group_name` (and read back by `split_group_name`).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Hashable, Iterable, Sequence

__all__ = [
    "APPLICATION_PREFIX",
    "application_name",
    "excess",
    "fair_share",
    "group_name",
    "group_of",
    "member_of",
    "new_member_id",
    "preferred",
    "score",
    "set_fingerprint",
    "split_group_name",
    "surplus",
]

Key = tuple[int, int]

#: How a balancing store's lock connection starts its application_name.
APPLICATION_PREFIX = "trio-eventstore balance "
_FINGERPRINT_CHARS = 8
_MEMBER_CHARS = 8
#: Postgres keeps the first 63 bytes of an application_name.
_NAME_BYTES = 63


def new_member_id() -> str:
    """A store's random member id (8 hex digits)."""
    return secrets.token_hex(_MEMBER_CHARS // 2)


def _digest(text: str, size: int = 8) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).digest()


def set_fingerprint(keys: Iterable[Key]) -> str:
    """The fingerprint of a set of subscription locks (8 hex digits): the same in every
    process for the same set (the locks' keys include the schema's table oid)."""
    text = ",".join(f"{k1}.{k2}" for k1, k2 in sorted(set(keys)))
    return _digest(text).hex()[:_FINGERPRINT_CHARS]


def application_name(fingerprint: str, member: str, schema: str) -> str:
    """The lock connection's application_name while it balances (cut to 63 bytes, as
    Postgres would: the set and the member always fit)."""
    name = f"{APPLICATION_PREFIX}{fingerprint} {member} {schema}"
    return name.encode()[:_NAME_BYTES].decode(errors="ignore")


def member_pattern(fingerprint: str) -> str:
    """A LIKE pattern matching the application_names of the stores running the set."""
    return f"{APPLICATION_PREFIX}{fingerprint} %"


def member_of(name: str) -> str | None:
    """The member id in a balancing lock connection's application_name."""
    parts = name[len(APPLICATION_PREFIX) :].split(" ")
    if not name.startswith(APPLICATION_PREFIX) or len(parts) < 2:
        return None
    return parts[1] or None


def fair_share(subscriptions: int, members: int) -> int:
    """The most subscriptions a store should hold: ``ceil(subscriptions / members)``."""
    return math.ceil(subscriptions / max(1, members))


def excess(held: int, total: int, others_hold: Sequence[int]) -> int:
    """How many of its ``held`` locks a store should hand over, ``others_hold`` being
    what each other member holds: what it holds beyond its fair share; or one, when it
    holds more than ``total // members`` while another member holds less (so 16 locks on
    3 stores end up 6/5/5, not 6/6/4)."""
    members = len(others_hold) + 1
    over = held - fair_share(total, members)
    if over > 0:
        return over
    floor = total // members
    return 1 if held > floor and any(n < floor for n in others_hold) else 0


def score(key: Key, member: str) -> int:
    """The rendezvous score of a lock for a member: the highest scoring member of a lock
    is its preferred holder."""
    return int.from_bytes(_digest(f"{key[0]}.{key[1]}/{member}"), "big")


def preferred(keys: Iterable[Key], member: str, limit: int) -> list[Key]:
    """Up to ``limit`` of the locks ``keys``, those this member scores highest first."""
    if limit <= 0:
        return []
    return sorted(keys, key=lambda k: score(k, member), reverse=True)[:limit]


def surplus(held: Iterable[Key], member: str, others: Iterable[str], count: int) -> list[Key]:
    """``count`` of the ``held`` locks to hand over: those whose preferred holders are
    other members, the most clearly so first (deterministic, so repeated rounds pick the
    same ones)."""
    if count <= 0:
        return []
    rivals = sorted(set(others) - {member})

    def margin(key: Key) -> int:
        best = max((score(key, other) for other in rivals), default=0)
        return score(key, member) - best

    return sorted(held, key=lambda k: (margin(k), k))[:count]


def group_of(key: Hashable, groups: int) -> int:
    """The partition group (0 .. groups - 1) of a partition key: a hash of the key (a
    ``str`` as is, anything else by its ``repr()``) that is the same in every process."""
    text = key if isinstance(key, str) else repr(key)
    return int.from_bytes(_digest(text), "big") % groups


def group_name(name: str, group: int, groups: int) -> str:
    """The subscription row of one partition group: ``<name>#g<group>/<groups>``."""
    return f"{name}#g{group}/{groups}"


#: ``#g<group>/<groups>`` at the end of a name, as `group_name` writes the numbers.
_GROUP_SUFFIX = re.compile(r"#g(0|[1-9][0-9]*)/([1-9][0-9]*)\Z")


def split_group_name(row_name: str) -> tuple[str, int, int] | None:
    """``(name, group, groups)`` of a partition group's row name, as `group_name` makes
    it; None for any other name (``orders#archive``, ``orders#g1/1``, ``orders#g01/2``)."""
    match = _GROUP_SUFFIX.search(row_name)
    if match is None:
        return None
    group, groups = int(match[1]), int(match[2])
    if group >= groups:
        return None
    return row_name[: match.start()], group, groups
