"""The one asyncio boundary: asyncpg on a trio-asyncio loop, seen from Trio.

Nothing else in the package imports asyncpg or trio_asyncio (import-linter checks
it). The rest of the package talks to Postgres through what this package exports:

* `Conn`: an asyncio-flavoured view of one connection, used *inside* a unit of work;
* `Database`: the pool, seen from Trio; `Database.transaction(fn)` runs a whole unit
  of work ``fn(conn)`` in one crossing of the Trio/asyncio bridge (a crossing costs
  ~170 µs, so never one per statement or per row);
* `TransactionConnection`: a pooled connection inside a transaction, driven from Trio
  one statement per crossing (`Database.open_transaction`: for code that is not ours,
  such as a projection's handler);
* `Database.fetchrow_direct`: one hot statement (a lone append) sent straight from Trio
  by `_wire` (the extended query protocol, no asyncio, no crossing), with a fallback to
  asyncpg for what `_wire` does not speak;
* `Database.reserve_slot`: a pooled connection's place taken ahead for the next statement
  (the group-commit writer takes appends from its queue only once it holds one);
* `open_connection`: one dedicated connection (admin tasks, LISTEN, advisory locks);
  those that live as long as the store keep TCP keepalives on both ends, and reconnect
  after `reconnect_delays`.

Every asyncpg / OS error is translated here, once, into the `EventStoreError`
hierarchy (`translate_error`), with passwords scrubbed from messages.

Cancellation: cancelling the Trio caller cancels the asyncio task once; the task then
rolls back and releases its connection with a bounded deadline (the cleanup cannot
be cancelled again, and a connection whose cleanup fails or times out is terminated,
never returned to the pool in an unknown transaction state). The Trio caller waits
for that cleanup before `trio.Cancelled` propagates.

Modules, each importing only those below it:

* `_database`: `Database` (units of work, statements sent straight by `_wire`,
  Trio-driven transactions), `open_database` (pools shared between stores);
* `_pool`: the Trio-side pool: slots, admission (overload), `reserve_slot`'s places;
  `_listener`: the store's LISTEN session (`_wire` where it can, else asyncpg);
* `_connection`: dedicated connections, connecting (TLS files, keepalives), LISTEN;
  `_wire`: PostgreSQL's protocol spoken from Trio, for `Database.fetchrow_direct`;
  `_transaction`: `TransactionConnection` (`Database.open_transaction`);
* `_bridge`: the trio-asyncio loop, its batching overrides, crossing into it;
  `_units`: the asyncio side of a unit of work on one connection (`Conn`);
  `_wire_codecs`: `_wire`'s binary parameters and rows;
* `_translate`: driver error translation.
"""

from ._connection import Connection, open_connection, reconnect_delays
from ._database import Database, open_database
from ._listener import Listener, open_listener
from ._pool import waiting_out_overload
from ._transaction import TransactionConnection
from ._translate import translate_error
from ._units import CLEANUP_TIMEOUT, Conn, Row

__all__ = [
    "waiting_out_overload",
    "CLEANUP_TIMEOUT",
    "Conn",
    "Connection",
    "Database",
    "Listener",
    "Row",
    "TransactionConnection",
    "open_connection",
    "open_database",
    "open_listener",
    "reconnect_delays",
    "translate_error",
]
