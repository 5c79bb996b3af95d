"""A fake Flower Grid that runs the ClientApp in-process, and the simulator run to compare with."""
import json
import uuid

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid


class FakeGrid(Grid):
    """Nodes 1..N with partition ids 0..N-1; a push runs the ClientApp at once (through a
    serialise/deserialise round trip of both messages, as on the wire); `fail` maps a node to a
    callable(message_type, round) -> True when that node must answer with an error (or None:
    no reply at all)."""

    def __init__(self, client_app, n_nodes: int, run_config: dict, fail=None):
        self.app, self.run_config, self.fail = client_app, run_config, fail or {}
        self.nodes = list(range(1, n_nodes + 1))
        self.replies: dict[str, Message] = {}
        from flwr.supercore.task_identity import TaskIdentity

        for field in ("run_id", "node_id", "task_id"):  # what a runtime sets before any Message is built
            if getattr(TaskIdentity, "_" + field) is None:
                setattr(TaskIdentity, field, 1)

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from flwr.app import Error

        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": self.nodes.index(node),
                                                               "num-partitions": len(self.nodes)},
                          state=RecordDict(), run_config=self.run_config)
            wire = Message(_roundtrip(msg.content), node, msg.metadata.message_type, group_id=msg.metadata.group_id)
            wire.metadata.__dict__["_message_id"] = mid
            verdict = self.fail.get(node, lambda kind, group: False)(msg.metadata.message_type, msg.metadata.group_id)
            if verdict is None:
                pass  # lost: never answers
            elif verdict:
                reply = Message(Error(code=2, reason="ClientApp raised: boom"), reply_to=wire)
                self.replies[mid] = reply
            else:
                reply = self.app(wire, ctx)
                reply.metadata.__dict__["_src_node_id"] = node
                self.replies[mid] = Message(_roundtrip(reply.content), reply_to=wire)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        return self.pull_messages(self.push_messages(messages))


def _roundtrip(content: RecordDict) -> RecordDict:
    """The RecordDict as another process would see it (Flower's own (de)serialisation)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objs = get_all_nested_objects(content)
    blobs = {oid: o.deflate() for oid, o in objs.items()}
    return inflate_object_from_contents(content.object_id, blobs, keep_object_contents=False)


def run_config(cfg, nodes: int, round_timeout: float = 5.0) -> dict:
    from fedrouter_jax.config import config_to_dict

    return {"fedrouter-config": json.dumps(config_to_dict(cfg)), "nodes": nodes, "round-timeout": round_timeout,
            "setup-timeout": 30.0}
