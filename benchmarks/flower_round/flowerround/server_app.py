"""A ServerApp running plaintext FedAvg and printing each round's wall time as a parseable line."""

import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that times each round from sending the model to holding the average."""

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self._began = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        result = super().aggregate_train(server_round, replies)
        print(f"FIBEMRSS_FLOWER_ROUND {server_round} {time.perf_counter() - self._began:.4f}", flush=True)
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    n_params = int(context.run_config["num-params"])
    nodes = int(context.run_config["num-nodes"])
    strategy = TimedFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes
    )
    initial = ArrayRecord([np.random.default_rng(0).normal(0, 0.1, n_params).astype(np.float32)])
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(context.run_config["num-server-rounds"]))
