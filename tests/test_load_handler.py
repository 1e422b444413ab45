"""What `trio-eventstore run module:name` says of a name that is not a handler."""

from __future__ import annotations

import pytest

from trio_eventstore._daemon import load_handler

NOT_A_HANDLER = 42


class NotAHandlerEither:
    pass


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.test_load_handler:nosuch", "no handler function or EventHandler of that name"),
        ("tests.test_load_handler:NOT_A_HANDLER", "is an int, not a handler function"),
        ("tests.test_load_handler:NotAHandlerEither", "is a class, not a handler function"),
        ("tests.nosuchmodule:x", "cannot import 'tests.nosuchmodule'"),
        ("no_colon", "expected 'package.module:function'"),
    ],
)
def test_a_name_that_is_not_a_handler_says_what_it_is(target: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_handler(target)
