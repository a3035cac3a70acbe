"""Which features a judge run covers: a seeded sample of live features per layer, or an explicit list.

Each layer's eligible features get a fixed seeded permutation and the run takes its first ``n_per_layer``,
so a larger ``n_per_layer`` extends an earlier sample instead of drawing a new one (resume pays only for
the new features), and the sample does not depend on the order rows come out of the store.
"""
from __future__ import annotations

import random

from ..collect_options import parse_layers
from ..errors import UserError


def parse_feature_list(spec: str | None) -> list[tuple[int, int]] | None:
    """``"3:17,4:2"`` → [(3, 17), (4, 2)]."""
    if spec is None or not spec.strip():
        return None
    out = []
    for part in spec.split(","):
        try:
            layer, feature = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise UserError(f"bad --features {spec!r}: use LAYER:FEATURE pairs, e.g. 3:17,4:2") from None
        out.append((layer, feature))
    return sorted(set(out))


def select_features(store, source: str, *, n_per_layer: int, seed: int, min_freq: float = 0.0,
                    min_examples: int = 1, layers: str | list[int] | None = None,
                    features: str | list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """(layer, feature) pairs in layer order; explicit ``features`` must be live, sampling needs enough examples."""
    live = store.con.execute(
        "SELECT layer, feature, activation_count, activation_freq FROM features WHERE source = ? ORDER BY layer, feature",
        [source]).fetchall()
    if not live:
        raise UserError(f"the store has no live {source} features (nothing collected for that source?)")
    wanted = parse_feature_list(features) if isinstance(features, str) else features
    if wanted:
        known = {(l, f) for l, f, _, _ in live}
        dead = [f"{l}:{f}" for l, f in wanted if (l, f) not in known]
        if dead:
            raise UserError(f"not live {source} features in this store: {', '.join(dead[:10])}")
        return list(wanted)
    if n_per_layer <= 0:
        raise UserError("--n-per-layer must be positive")
    layer_set = parse_layers(layers) if isinstance(layers, str) else layers
    by_layer: dict[int, list[int]] = {}
    for layer, feature, count, freq in live:
        if layer_set is not None and layer not in layer_set:
            continue
        if (freq or 0.0) >= min_freq and count >= min_examples:
            by_layer.setdefault(layer, []).append(feature)
    if layer_set is not None:
        missing = sorted(set(layer_set) - {l for l, *_ in live})
        if missing:
            raise UserError(f"--layers {missing} have no live {source} features in this store")
    chosen = []
    for layer in sorted(by_layer):
        order = sorted(by_layer[layer])
        random.Random(f"{seed}:{source}:{layer}").shuffle(order)
        chosen.extend((layer, f) for f in sorted(order[:n_per_layer]))
    if not chosen:
        raise UserError(f"no {source} feature has activation_freq >= {min_freq:g} and >= {min_examples} activations")
    return chosen
