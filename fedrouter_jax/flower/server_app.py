"""The ServerApp: reads the run config the driver wrote and runs `FlowerServer` over the Grid.

Run config (pyproject of the generated app, `flwr run --run-config`): fedrouter-config (the
resolved config as JSON), nodes (how many nodes to wait for at setup), round-timeout and
setup-timeout (seconds).
"""
from __future__ import annotations

import json

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrouter_jax.flower.server import FlowerServer
from fedrouter_jax.flower.transport import Transport

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedrouter_jax.config import config_from_dict

    rc = context.run_config
    cfg = config_from_dict(json.loads(rc["fedrouter-config"]))
    server = FlowerServer(cfg, Transport(grid, timeout=float(rc["round-timeout"])), nodes=int(rc["nodes"]),
                          setup_timeout=float(rc["setup-timeout"]), log=lambda line: print(line, flush=True))
    server.run()
