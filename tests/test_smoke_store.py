import trio_eventstore as es


async def test_stream_info_of_all(store: es.EventStore) -> None:
    info = await store.stream_info(es.ALL_STREAMS)
    assert info.stream_id == 0
    assert info.stream_version == 0
    assert info.status is es.StreamStatus.CREATED
