"""`fedrouter-jax predict`: greedy answers from a bundle, each input routed as the method does.

    predict_file(bundle_dir, "in.jsonl", "out.jsonl", client=0, router="local")

Each input line is a JSON object with string fields `instruction` and `input`; each output line
`{"line", "prediction", "adapter", "adapter_name", "tokens"}` (+ `mix_adapter`, `mix_weight`,
`self_weight` for a blend), in input order. The inputs are embedded with the base model as in
training (`embeddings.embed_tokens` over `data.encode_inputs`), routed by the bundle's rule
(bundle.py), and generated in mixed-adapter batches (`routing.generate_routed`, "mixed": each
row gathers its own adapter in one jitted call) from the prompts `data.encode_prompts` builds.
Only the adapters the inputs use are loaded. FedDPA's dynamic blend weighs each input by
`baselines.dynamic_blend` of its feature (reference: the last-token state of its prompt under
base + the client's local adapter, `baselines.last_token_states`; pre_issue16: its embedding)
against the client's training features the bundle carries, drawn as the evaluator draws them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from fedrouter_jax.bundle import Bundle, BundleError, read_bundle
from fedrouter_jax.routing import EvalPlan


def read_examples(path: str | Path) -> tuple[list[dict], list[int]]:
    """(examples, their 1-based line numbers) of a JSONL file; blank lines are skipped and any
    other bad line is a BundleError naming FILE:LINE."""
    path = Path(path)
    examples, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BundleError(f"{path}:{lineno}: not a JSON object ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise BundleError(f"{path}:{lineno}: expected a JSON object with string fields instruction "
                                  f"and input, got {type(obj).__name__}")
            for key in ("instruction", "input"):
                if not isinstance(obj.get(key), str):
                    got = "missing" if key not in obj else f"{type(obj[key]).__name__}, expected a string"
                    raise BundleError(f"{path}:{lineno}: field {key!r} is {got}")
            examples.append({"instruction": obj["instruction"], "input": obj["input"]})
            lines.append(lineno)
    if not examples:
        raise BundleError(f"{path}: no input lines")
    return examples, lines


@dataclasses.dataclass
class Routes:
    """Per input: ids [N] bundle adapter ids (-1 = base); for a blend also mix_ids [N],
    mix_weight [N], self_weight [N] (update = self_weight dW(ids) + mix_weight dW(mix_ids))."""

    ids: np.ndarray
    mix_ids: Optional[np.ndarray] = None
    mix_weight: Optional[np.ndarray] = None
    self_weight: Optional[np.ndarray] = None


def check_router(bundle: Bundle, mode: str, client: Optional[int]) -> dict:
    """The rule of `mode`, after checking that the client the rule needs is given and exists."""
    rule = bundle.router(mode)
    if rule["needs_client"] and client is None:
        why = ("routes with that client's local centroids" if mode == "local" else
               f"has no client-independent router for method {bundle.method} (each client has its own adapter)")
        raise BundleError(f"--router {mode} needs --client: the bundle's {mode} router {why}")
    if client is not None and not 0 <= client < bundle.n_clients:
        raise BundleError(f"--client {client}: the bundle has clients 0..{bundle.n_clients - 1}")
    mixing = rule.get("mixing", {})
    if not mixing.get("servable", True):
        raise BundleError(f"{bundle.directory}/bundle.json: routers.{mode}.mixing: {bundle.method} with mixing "
                          f"{mixing['kind']!r} cannot serve from this bundle ({mixing['why']})")
    return rule


def blend_features(bundle: Bundle, rule: dict, base, model_cfg, prompts, emb, client: int) -> Optional[np.ndarray]:
    """The inputs' features a dynamic blend compares with the client's training features
    (bundle.json mixing.input_features) [n, D], or None for any other rule."""
    mixing = rule.get("mixing", {})
    if rule["rule"] != "blend" or mixing.get("kind") != "dynamic":
        return None
    if mixing["variant"] != "reference":
        return emb
    from fedrouter_jax.algorithms.baselines import last_token_states

    local = bundle.load_adapters([rule["mix_adapter_of_client"][client]])
    return last_token_states(base, model_cfg, local, prompts[0], prompts[1], bundle.meta["generation"]["batch_size"])


def route(bundle: Bundle, rule: dict, emb: Optional[np.ndarray], n: int, client: Optional[int],
          features: Optional[np.ndarray] = None) -> Routes:
    """Bundle adapter ids for n inputs with embeddings emb [n, D] (None when the rule ignores them);
    features [n, D]: `blend_features` (a dynamic blend only)."""
    from fedrouter_jax.clustering import nearest_centroid

    kind = rule["rule"]
    if kind == "fixed":
        return Routes(np.full(n, rule["adapter"], np.int32))
    if kind == "per_client":
        return Routes(np.full(n, rule["adapter_of_client"][client], np.int32))
    if kind == "nearest_centroid":
        nearest = np.asarray(nearest_centroid(emb, bundle.arrays[rule["centroids"]]))
        return Routes(np.asarray(rule["adapter_of_centroid"], np.int32)[nearest])
    if kind == "nearest_client_centroid":
        table = np.asarray(rule["adapter_of_centroid"][client], np.int32)
        nearest = np.asarray(nearest_centroid(emb, bundle.arrays[rule["centroids"]][client], table >= 0))
        return Routes(table[nearest])
    if kind == "blend":
        mixing = rule["mixing"]
        full = lambda v, dtype: np.full(n, v, dtype)  # noqa: E731
        if mixing["kind"] == "fixed":
            self_w, mix_w = full(mixing["self_weight"], np.float32), full(mixing["mix_weight"], np.float32)
        else:
            from fedrouter_jax.algorithms.baselines import draw_rng, dynamic_blend

            train = bundle.arrays[mixing["features"]][client][: int(mixing["train_count"][client])]
            self_w, mix_w = dynamic_blend(mixing["variant"], features, train, max_weight=mixing["max_weight"],
                                          instance_num=mixing["instance_num"], train_weight=mixing["train_weight"],
                                          rng=draw_rng(mixing["seed"], client))
        return Routes(full(rule["adapter"], np.int32), mix_ids=full(rule["mix_adapter_of_client"][client], np.int32),
                      mix_weight=mix_w, self_weight=self_w)
    raise BundleError(f"{bundle.directory}/bundle.json: unknown router rule {kind!r}")


def eval_plan_for(bundle: Bundle, routes: Routes) -> EvalPlan:
    """An EvalPlan over only the adapters `routes` uses (loaded from their PEFT directories)."""
    used = np.unique(np.concatenate([routes.ids] + ([] if routes.mix_ids is None else [routes.mix_ids])))
    used = used[used >= 0]
    local = lambda ids: np.where(ids >= 0, np.searchsorted(used, ids), -1).astype(np.int32)  # noqa: E731
    return EvalPlan(
        adapters=bundle.load_adapters(used) if used.size else None, adapter_ids=[local(routes.ids)],
        mix_ids=None if routes.mix_ids is None else [local(routes.mix_ids)],
        mix_weight=None if routes.mix_weight is None else [routes.mix_weight],
        self_weight=None if routes.self_weight is None else [routes.self_weight],
    )


def base_model_dir(bundle: Bundle, override: Optional[str] = None) -> Path:
    """The base model's directory (`override` or the bundle's path), checked by fingerprint."""
    from fedrouter_jax.embeddings import file_fingerprint, model_fingerprint

    meta = bundle.meta["base_model"]
    path = override or meta["path"]
    if path == "embedded":
        from fedrouter_jax.assets import embedded_model_dir

        model_dir = embedded_model_dir()
    else:
        model_dir = Path(path)
    if not (model_dir / "config.json").is_file():
        raise BundleError(f"{model_dir}: no base model here (bundle.json base_model.path; pass --base-model DIR)")
    if model_fingerprint(model_dir) != meta["fingerprint"]:
        raise BundleError(f"{model_dir}: not the base model of this bundle (its fingerprint differs from "
                          f"bundle.json base_model.fingerprint {meta['fingerprint']})")
    tok = [p for p in (model_dir / "tokenizer.json",) if p.exists()]
    if file_fingerprint(tok) != meta["tokenizer_fingerprint"]:
        raise BundleError(f"{model_dir}: tokenizer differs from the bundle's (base_model.tokenizer_fingerprint)")
    return model_dir


def predict(bundle: Bundle, examples: list[dict], *, client: Optional[int] = None, router: Optional[str] = None,
            max_new_tokens: Optional[int] = None, base_model: Optional[str] = None) -> tuple[list[dict], Routes]:
    """Routed greedy answers for `examples` -> (one record per example, the routes)."""
    import jax.numpy as jnp

    from fedrouter_jax.data import encode_inputs, encode_prompts
    from fedrouter_jax.embeddings import embed_tokens
    from fedrouter_jax.models.hf_io import load_pretrained
    from fedrouter_jax.routing import generate_routed
    from fedrouter_jax.runner import load_model_tokenizer

    mode = router or bundle.meta["default_router"]
    rule = check_router(bundle, mode, client)
    model_dir = base_model_dir(bundle, base_model)
    dtype = jnp.bfloat16 if bundle.meta["base_model"]["dtype"] == "bfloat16" else jnp.float32
    model_cfg, base = load_pretrained(model_dir, dtype)
    tok = load_model_tokenizer(model_dir)
    emb = None
    if rule["embeds"]:
        e = bundle.meta["embedding"]
        tokens, mask = encode_inputs(examples, tok, e["max_tokens"], pad_multiple=e["pad_multiple"])
        emb = embed_tokens(base, model_cfg, tokens, mask, batch_size=e["batch_size"])
    prompts = encode_prompts(examples, tok, bundle.meta["prompt"]["max_prompt_tokens"], warn=False)[:2]
    features = blend_features(bundle, rule, base, model_cfg, prompts, emb, client)
    routes = route(bundle, rule, emb, len(examples), client, features)
    gen = bundle.meta["generation"]
    n_new = int(max_new_tokens or gen["max_new_tokens"])
    out = generate_routed(base, model_cfg, eval_plan_for(bundle, routes), [prompts], batching="mixed",
                          batch_size=gen["batch_size"], max_new_tokens=n_new, eos_ids=(tok.eos_token_id,),
                          pad_id=tok.pad_token_id)[0]
    texts = tok.batch_decode([t.tolist() for t in out], skip_special_tokens=True)
    names = [a["name"] for a in bundle.meta["adapters"]]
    records = []
    for i, (text, toks) in enumerate(zip(texts, out)):
        a = int(routes.ids[i])
        rec = {"prediction": text.strip(), "adapter": a, "adapter_name": names[a] if a >= 0 else None,
               "tokens": toks.tolist()}
        if routes.mix_ids is not None:
            rec.update(mix_adapter=int(routes.mix_ids[i]), mix_weight=float(routes.mix_weight[i]),
                       self_weight=float(routes.self_weight[i]))
        records.append(rec)
    return records, routes


def predict_file(bundle_dir: str | Path, input_path: str | Path, output_path: str | Path, **kw) -> list[dict]:
    """Read the inputs (all checked before the model loads), predict, write OUT atomically."""
    bundle = read_bundle(bundle_dir)
    check_router(bundle, kw.get("router") or bundle.meta["default_router"], kw.get("client"))
    examples, lines = read_examples(input_path)
    records, _ = predict(bundle, examples, **kw)
    records = [{"line": ln, **r} for ln, r in zip(lines, records)]
    output_path = Path(output_path)
    tmp = output_path.with_name(f".{output_path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, output_path)
    return records
