"""The public namespace: `trio_eventstore.__all__` is the API (re-exports only)."""

from __future__ import annotations

import importlib
import pkgutil
import tomllib
from pathlib import Path

import trio

import trio_eventstore as es

# Names DESIGN.md promises that exist at this stage, plus those in CHANGELOG.md.
EXPECTED = {
    "ALL_STREAMS",
    "ANY_VERSION",
    "CURRENT",
    "NO_STREAM",
    "ORIGIN",
    "STREAM_EXISTS",
    "EventStore",
    "EventStoreConfig",
    "EventStoreStatistics",
    "HistogramSnapshot",
    "WriterStatistics",
    "ExpectedVersion",
    "StartFrom",
    "StreamInfo",
    "StreamStatus",
    "open_event_store",
    "new_event_id",
    "EventStoreError",
    "WrongExpectedVersionError",
    "StreamExistsError",
    "StreamNotFoundError",
    "StreamDeletedError",
    "DuplicateEventError",
    "SnapshotNotFoundError",
    "SerializationError",
    "UnknownEventTypeError",
    "SubscriptionAlreadyExistsError",
    "TooManySubscribersError",
    "InvalidStartFromError",
    "UnexpectedAckError",
    "SubscriptionFailedError",
    "NotSupportedError",
    "StorageUnavailableError",
    "AuthenticationError",
    "SchemaNotInitializedError",
    "SchemaMismatchError",
    "DatabaseError",
    "EventNotFoundError",
    "EventTooLargeError",
    "EventData",
    "Page",
    "RecordedEvent",
    "SnapshotData",
    "JsonSerializer",
    "HandlerFailedError",
    "BatchHandler",
    "EventHandler",
    "Handler",
    "HandlerContext",
    "SubscriberSpec",
    "SubscriberStatistics",
    "open_subscriber_daemon",
    "run_subscribers",
    "PoolOverloadedError",
    "SubscriptionNotFoundError",
    "EventBatch",
    "Subscription",
    "SubscriptionStatistics",
    "TransientSubscription",
    "Serializer",
    "EventStoreClosedError",
    "DatabaseNotFoundError",
    "CheckpointFailedError",
    "AccessRejectedError",
    "InsufficientPrivilegeError",
    "TLSError",
    "Projection",
    "TransactionConnection",
    "DEFAULT_RETRY_POLICY",
    "ParkedEvent",
    "RetryPolicy",
    "UndecodedEvent",
}


def test_all_is_the_expected_list() -> None:
    assert set(es.__all__) == EXPECTED
    assert len(es.__all__) == len(set(es.__all__))
    for name in es.__all__:
        assert hasattr(es, name), name


def test_public_objects_live_in_private_modules() -> None:
    for name in es.__all__:
        module = getattr(getattr(es, name), "__module__", None)
        if module is not None and module.startswith("trio_eventstore"):
            assert module.split(".")[1].startswith("_"), (name, module)


def test_error_hierarchy() -> None:
    for name in es.__all__:
        obj = getattr(es, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, es.EventStoreError), name
    assert issubclass(es.StreamNotFoundError, LookupError)
    assert issubclass(es.SnapshotNotFoundError, LookupError)
    assert issubclass(es.SerializationError, ValueError)
    assert issubclass(es.StorageUnavailableError, trio.BrokenResourceError)
    assert issubclass(es.StreamExistsError, es.WrongExpectedVersionError)


def test_only_pg_imports_the_asyncio_world() -> None:
    for info in pkgutil.iter_modules(es.__path__):
        module = importlib.import_module(f"trio_eventstore.{info.name}")
        if info.name == "_pg":
            continue
        for attr in vars(module).values():
            owner = getattr(attr, "__name__", "")
            assert owner not in ("asyncpg", "trio_asyncio"), info.name


def test_every_package_is_in_the_distribution() -> None:
    """A subpackage missing from pyproject's package list is missing from the wheel
    (the editable install used by the tests would not notice)."""
    root = Path(es.__file__).parent
    on_disk = {
        ".".join(init.parent.relative_to(root.parent).parts) for init in root.rglob("__init__.py")
    }
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(pyproject["tool"]["setuptools"]["packages"]) == on_disk


def test_markers() -> None:
    assert es.ALL_STREAMS == "$all"
    assert repr(es.NO_STREAM) == "NO_STREAM"
    assert es.CURRENT is es.StartFrom.CURRENT
