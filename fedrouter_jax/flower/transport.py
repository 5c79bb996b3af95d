"""Messages out, replies in: one exchange per phase over a Flower `Grid`, with a deadline.

`exchange` pushes one message per node and pulls every 50 ms (the Grid's own
`send_and_receive` sleeps 3 s between pulls) until every node replied or `timeout` passed.
A node that did not reply in time, or replied with an error, is reported, never raised:
the round goes on with the replies that arrived.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

from flwr.app import Message, RecordDict

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode
REASONS = {NODE_UNAVAILABLE: "node_unavailable"}


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a node's reply is missing: reason ("node_unavailable", "client_error", "timeout")
    and the runtime's detail (error code and message, or the timeout)."""

    reason: str
    detail: str = ""


class Transport:
    """A Grid with a deadline per exchange (seconds) and the poll interval between pulls."""

    def __init__(self, grid, *, timeout: float, poll: float = 0.05):
        self.grid, self.timeout, self.poll = grid, float(timeout), float(poll)

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(self, message_type: str, contents: dict[int, RecordDict], group: str,
                 timeout: Optional[float] = None) -> tuple[dict[int, RecordDict], dict[int, Failure]]:
        """Sends contents[node] to each node -> (replies by node, failures by node)."""
        timeout = self.timeout if timeout is None else float(timeout)
        msgs = [Message(content, int(node), message_type, ttl=timeout, group_id=group)
                for node, content in contents.items()]
        ids = list(self.grid.push_messages(msgs))
        node_of = dict(zip(ids, contents))
        replies, failures = {}, {}
        deadline = time.monotonic() + timeout
        while len(replies) + len(failures) < len(node_of) and time.monotonic() < deadline:
            pending = [i for i, n in node_of.items() if n not in replies and n not in failures]
            for reply in self.grid.pull_messages(pending):
                node = node_of.get(reply.metadata.reply_to_message_id)
                if node is None:
                    continue
                if reply.has_error():
                    err = reply.error
                    failures[node] = Failure(REASONS.get(int(err.code), "client_error"),
                                             f"code {int(err.code)}: {str(err.reason).strip()[-2000:]}")
                else:
                    replies[node] = reply.content
            if len(replies) + len(failures) < len(node_of):
                time.sleep(self.poll)
        for node in node_of.values():
            if node not in replies and node not in failures:
                failures[node] = Failure("timeout", f"no reply within {timeout:g} s")
        return replies, failures
