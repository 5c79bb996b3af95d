"""FedRouter (and every method of `fedrouter-jax methods`) as a Flower ServerApp + ClientApp.

A thin adapter: the method's client / server functions (algorithms/base.py) run unchanged, the
app only moves their states and messages (`records`), with a deadline per exchange
(`transport`). `fedrouter-jax flower --runtime simulation|deployment` starts everything on
127.0.0.1 (`driver`). Needs the `flower` extra (flwr 1.42).

  records.py     pytrees <-> RecordDict (no pickle; bf16 restored)
  client_app.py  ClientApp: hello / setup / train / evaluate for the node's clients
  server.py      FlowerServer: setup, rounds, evaluation, checkpoints (the simulator's files)
  server_app.py  ServerApp main over the Grid
  transport.py   one message per node, 50 ms pulls, round timeout, failures as reasons
  driver.py      SuperLink + SuperNodes (or the simulation runtime) as processes, flwr run, status
"""
