"""Federated task partitions: Single, Dual, All, generalization and a Dirichlet task mixture.

Following the authors' ``federated_learning/split_dataset.py`` (task order
``TASKS = ("qqp", "gigaword", "samsum", "webnlg")``, pairs of clients sharing a task set):

==============  ===========================================  ==============================
scenario        client i's train tasks                       test tasks
==============  ===========================================  ==============================
single          TASKS[(i // 2) % 4]                          = train tasks
dual            TASKS[(i // 2) % 4], TASKS[(i // 2 + 1) % 4]  = train tasks
all             all four                                     = train tasks
generalization  as single                                    all four
dirichlet       mixture p_i ~ Dir(alpha * 1_4)               same mixture p_i
==============  ===========================================  ==============================

The authors compute the group as ``i // (num_clients // 4)`` (only valid for 8 clients in
practice); we use pairs, ``(i // 2) % 4``, which equals theirs for N = 8 and keeps "pairs share
a task set" for any N. Their Dual split cuts task 1's pool in halves; we draw disjoint samples
per client instead (same effect: same-task clients never share an example).

Sizes: each client gets ``train_per_client`` / ``test_per_client`` examples split evenly across
its tasks (remainder to the first tasks in its list), e.g. Dual 300 + 300, All 4 x 150. Test
examples never coincide with any client's training example (all draws of a task come from one
pool without replacement). Clients with the same task set get different samples.

Mixes (``mix``): ``"even"`` as above, or ``"pool_sizes"``: a Dual or All client's task shares
follow the sizes of the authors' task pools (:data:`AUTHORS_POOL_SIZES`; their clients take
shards of the concatenated, shuffled pools, so shares follow pool sizes): All = QQP 27.2 %,
Gigaword 27.2 %, WebNLG 32.2 %, SAMSum 13.4 %; Dual pairs 50/50, 67/33 (Gigaword/SAMSum),
29/71 (SAMSum/WebNLG), 54/46 (WebNLG/QQP). Counts are ``round(share * n)``, the rounding
remainder to the largest share; train and test alike.

Prompts (``prompt``): ``"alpaca"`` keeps each example's task instruction; ``"raw_input"`` blanks
it, so ``format_prompt`` puts the raw input alone in the authors' no-input template (their task
instructions are commented out, docs/FAITHFULNESS.md section 4). Embeddings read the raw input
either way.

Dirichlet (any number of clients, e.g. 100 or 512): client i draws task proportions
``p_i ~ Dirichlet(alpha, ..., alpha)`` over the four tasks, then per-task counts
``Multinomial(train_per_client, p_i)`` (and independently ``Multinomial(test_per_client, p_i)``
for its test set, so test follows the client's own mixture). Small alpha (0.1) gives nearly
single-task clients; alpha = 1 is uniform over the simplex; large alpha (100) approaches "all".

Per-client true task labels are kept FOR CLUSTERING-ACCURACY METRICS ONLY; NO ALGORITHM MAY READ
THEM (FedRouter must discover tasks from embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from fedrouter_jax.data.real import DataError, validate_examples
from fedrouter_jax.data.synthetic import TASKS, generate_examples

SCENARIOS = ("single", "dual", "all", "generalization", "dirichlet")
MIXES = ("even", "pool_sizes")
PROMPTS = ("alpaca", "raw_input")
TASK_INDEX = {t: i for i, t in enumerate(TASKS)}
# Training pool of each task in the authors' utils/process_dataset.py: QQP and Gigaword cut at
# 30 000, WebNLG (GEM/web_nlg en train) and SAMSum (Samsung/samsum train) whole.
AUTHORS_POOL_SIZES = {"qqp": 30000, "gigaword": 30000, "samsum": 14732, "webnlg": 35426}

# source(task, n, seed) -> n examples, or {task: examples}, or "synthetic"
Source = Union[str, Callable[[str, int, int], Sequence[dict]], Mapping[str, Sequence[dict]]]


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Per-client data of one scenario.

    Attributes:
      name: scenario name.
      train, test: C lists of example dicts ``{task, instruction, input, output}``.
      train_tasks, test_tasks: C int arrays [N_c] of true task ids (index into ``task_names``).
        For clustering-accuracy metrics only; no algorithm may read them.
      client_tasks: C tuples of the task names each client was assigned for training.
      task_names: ``TASKS``.
      seed: the seed used.
    """

    name: str
    train: list[list[dict]]
    test: list[list[dict]]
    train_tasks: list[np.ndarray]
    test_tasks: list[np.ndarray]
    client_tasks: list[tuple[str, ...]]
    task_names: tuple[str, ...] = TASKS
    seed: int = 0

    @property
    def n_clients(self) -> int:
        return len(self.train)

    def task_counts(self, split: str = "train") -> np.ndarray:
        """[C, 4] int: examples per (client, task). Metrics/tests only."""
        labels = {"train": self.train_tasks, "test": self.test_tasks}[split]
        return np.stack([np.bincount(l, minlength=len(self.task_names)) for l in labels])


def _even(n: int, k: int) -> list[int]:
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def client_task_sets(name: str, n_clients: int) -> list[tuple[str, ...]]:
    """Train task sets for the fixed scenarios (not dirichlet)."""
    if name in ("single", "generalization"):
        return [(TASKS[(i // 2) % 4],) for i in range(n_clients)]
    if name == "dual":
        return [(TASKS[(i // 2) % 4], TASKS[(i // 2 + 1) % 4]) for i in range(n_clients)]
    if name == "all":
        return [TASKS for _ in range(n_clients)]
    raise ValueError(f"unknown scenario {name!r}; valid scenarios: {', '.join(SCENARIOS)}")


def _pool_size_counts(n: int, tasks: Sequence[str]) -> list[int]:
    """n split over `tasks` in proportion to AUTHORS_POOL_SIZES (remainder to the largest share)."""
    share = np.array([AUTHORS_POOL_SIZES[t] for t in tasks], np.float64)
    share /= share.sum()
    counts = np.round(share * n).astype(int)
    counts[int(np.argmax(share))] += n - int(counts.sum())
    return counts.tolist()


def _plan(name: str, n_clients: int, n_train: int, n_test: int, seed: int, alpha: float, mix: str = "even"):
    """Per-client {task: count} for train and test, and the assigned task sets."""
    if name == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {alpha}")
        rng = np.random.default_rng([int(seed), 1])
        p = rng.dirichlet(np.full(len(TASKS), float(alpha)), size=n_clients)
        tr = [rng.multinomial(n_train, p[i]) for i in range(n_clients)]
        te = [rng.multinomial(n_test, p[i]) for i in range(n_clients)]
        train_plan = [{t: int(c[j]) for j, t in enumerate(TASKS) if c[j]} for c in tr]
        test_plan = [{t: int(c[j]) for j, t in enumerate(TASKS) if c[j]} for c in te]
        sets = [tuple(t for t in TASKS if t in train_plan[i] or t in test_plan[i])
                for i in range(n_clients)]
        return train_plan, test_plan, sets
    sets = client_task_sets(name, n_clients)
    split = _pool_size_counts if (mix == "pool_sizes" and name in ("dual", "all")) else (lambda n, s: _even(n, len(s)))
    train_plan = [dict(zip(s, split(n_train, s))) for s in sets]
    test_sets = [TASKS] * n_clients if name == "generalization" else sets
    test_plan = [dict(zip(s, split(n_test, s))) for s in test_sets]
    return train_plan, test_plan, sets


def _task_pool(source: Source, task: str, need: int, seed: int) -> list[dict]:
    """``need`` distinct examples of ``task`` in a seed-determined order, validated."""
    task_seed = int(np.random.default_rng([int(seed), 2, TASK_INDEX[task]]).integers(2**31))
    if isinstance(source, str):
        if source != "synthetic":
            raise ValueError(f"unknown source {source!r}; use 'synthetic', a callable "
                             f"(task, n, seed) -> examples, or a mapping task -> examples")
        pool = generate_examples(task, need, task_seed, unique=True)
        name = f"synthetic[{task}]"
    elif callable(source):
        pool = list(source(task, need, task_seed))
        name = f"source({task!r})"
    else:
        if task not in source:
            raise DataError(f"source has no examples for task {task!r} (have {sorted(source)})")
        pool = list(source[task])
        name = f"source[{task!r}]"
        pool = [pool[i] for i in np.random.default_rng([int(seed), 3, TASK_INDEX[task]])
                .permutation(len(pool))]
    pool, _ = validate_examples(pool, source=name, tasks=(task,))
    if len(pool) < need:
        raise DataError(f"{name}: need {need} {task} examples for this scenario, have "
                        f"{len(pool)}; lower train/test per client or add data")
    return pool[:need]


def build_scenario(name: str, *, n_clients: int = 8, train_per_client: int = 600,
                   test_per_client: int = 300, seed: int = 0, source: Source = "synthetic",
                   dirichlet_alpha: float = 0.5, mix: str = "even", prompt: str = "alpaca") -> FederatedData:
    """Partition task data over clients (module doc for the scenarios).

    Args:
      name: one of ``SCENARIOS``.
      n_clients: C.
      train_per_client, test_per_client: examples per client.
      seed: everything (mixtures, which examples, their order) is a function of the seed.
      source: "synthetic", a callable ``(task, n, seed) -> examples``, or ``{task: examples}``
        (e.g. from ``real.load_real_tasks``); all are validated with ``validate_examples``.
      dirichlet_alpha: concentration for ``name="dirichlet"``.
      mix: ``MIXES`` (module doc): task shares of Dual / All clients.
      prompt: ``PROMPTS`` (module doc): ``"raw_input"`` blanks every example's instruction.

    Returns:
      :class:`FederatedData`; each client's train and test lists are shuffled (tasks mixed).
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; valid scenarios: {', '.join(SCENARIOS)}")
    if n_clients < 1 or train_per_client < 0 or test_per_client < 0:
        raise ValueError("n_clients must be >= 1 and per-client sizes >= 0")
    if mix not in MIXES:
        raise ValueError(f"data.mix: unknown value {mix!r}; valid: {', '.join(MIXES)}")
    if prompt not in PROMPTS:
        raise ValueError(f"data.prompt: unknown value {prompt!r}; valid: {', '.join(PROMPTS)}")
    train_plan, test_plan, sets = _plan(name, n_clients, train_per_client, test_per_client,
                                        seed, dirichlet_alpha, mix)
    # One pool per task; consecutive slices go to clients' train sets, then test sets.
    need = {t: sum(p.get(t, 0) for p in train_plan) + sum(p.get(t, 0) for p in test_plan)
            for t in TASKS}
    pools = {t: _task_pool(source, t, n, seed) for t, n in need.items() if n}
    cursor = {t: 0 for t in pools}

    def take(plan: list[dict]) -> tuple[list[list[dict]], list[np.ndarray]]:
        data, labels = [], []
        for i, counts in enumerate(plan):
            ex, lab = [], []
            for t, k in counts.items():
                ex += pools[t][cursor[t]: cursor[t] + k]
                lab += [TASK_INDEX[t]] * k
                cursor[t] += k
            data.append(ex)
            labels.append(np.asarray(lab, np.int32))
        return data, labels

    train, train_tasks = take(train_plan)
    test, test_tasks = take(test_plan)
    # Mix tasks within each client (order must carry no task information).
    for split, (data, labels) in enumerate(((train, train_tasks), (test, test_tasks))):
        for i in range(n_clients):
            perm = np.random.default_rng([int(seed), 4, split, i]).permutation(len(data[i]))
            data[i] = [data[i][j] for j in perm]
            labels[i] = labels[i][perm]
            if prompt == "raw_input":
                data[i] = [{**ex, "instruction": ""} for ex in data[i]]
    return FederatedData(name=name, train=train, test=test, train_tasks=train_tasks,
                         test_tasks=test_tasks, client_tasks=sets, seed=int(seed))
