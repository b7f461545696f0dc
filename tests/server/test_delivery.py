"""The coordinator's event-driven delivery: who is gone, when a reply is whole, long polls."""

from __future__ import annotations

import asyncio
import threading

from confide.server.delivery import Delivery, objects_requested, pull_found_nothing


def test_a_client_is_gone_only_when_its_last_connection_closes_from_its_side():
    d = Delivery()
    d.connection_opened("a")
    d.connection_opened("a")
    d.connection_closed("a", by_client=True)
    assert d.gone_for("a") is None  # one connection left
    d.connection_closed("a", by_client=True)
    assert d.gone_for("a") is not None and d.gone_for("a") >= 0
    d.connection_opened("a")  # restarted: connected again
    assert d.gone_for("a") is None


def test_connections_the_gateway_closes_do_not_make_a_client_gone():
    d = Delivery()
    d.connection_opened("b")
    d.connection_closed("b", by_client=False)  # idle timeout, refusal, shutdown
    assert d.gone_for("b") is None
    assert d.gone_for("never-seen") is None


def test_the_round_loop_wakes_when_a_reply_is_whole_not_before():
    d = Delivery()
    start = d.generation
    d.reply_started("c", 2)
    assert d.generation == start  # the SuperLink still waits for two objects
    d.object_pushed("c")
    assert d.generation == start
    woke: list[int] = []
    waiter = threading.Thread(target=lambda: woke.append(d.wait(start, 30)))
    waiter.start()
    d.object_pushed("c")
    waiter.join(30)
    assert woke == [start + 1]
    d.reply_started("c", 0)  # nothing to push: whole at once
    assert d.generation == start + 2


def test_a_held_pull_is_released_by_the_end_of_a_push():
    d = Delivery(hold_s=30)

    async def scenario() -> tuple[bool, bool]:
        d.attach(asyncio.get_running_loop())
        pushing = d.pushing()
        pushing.__enter__()
        await asyncio.sleep(0)  # the loop learns of the push
        finished = threading.Event()

        def finish_push() -> None:
            finished.wait(30)
            pushing.__exit__(None, None, None)

        threading.Thread(target=finish_push).start()
        pull = asyncio.ensure_future(d.before_pull())  # waits while the push runs
        await asyncio.sleep(0.05)
        waited = not pull.done()
        finished.set()
        delivered = await asyncio.wait_for(pull, 30)
        # the next push releases a pull held on the event handed out now
        held = asyncio.ensure_future(d.hold(delivered))
        await asyncio.sleep(0)
        with d.pushing():
            pass
        return waited, await asyncio.wait_for(held, 30)

    waited, released = asyncio.run(scenario())
    assert waited and released


def test_a_hold_without_news_ends_empty():
    d = Delivery(hold_s=0.05)

    async def scenario() -> bool:
        d.attach(asyncio.get_running_loop())
        return await d.hold(await d.before_pull())

    assert asyncio.run(scenario()) is False


def test_flower_responses_are_read_and_garbage_is_not_trusted():
    from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesResponse
    from flwr.proto.message_pb2 import Message

    assert pull_found_nothing(PullMessagesResponse().SerializeToString())
    full = PullMessagesResponse(messages_list=[Message()]).SerializeToString()
    assert not pull_found_nothing(full)
    assert not pull_found_nothing(b"\xff\xff\xff")  # unreadable: answered, never held
    assert objects_requested(PushMessagesResponse(objects_to_push=["x", "y"])
                             .SerializeToString()) == 2
    assert objects_requested(b"\xff\xff\xff") is None
