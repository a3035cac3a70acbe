"""``featurestore trace`` and ``featurestore steer``: run the model on a text, see its features, intervene on them."""
from __future__ import annotations

import json

import click

from featurestore.errors import UserError

_FORMATS = ["deepseek", "qwen", "chat-template", "raw"]


def _common(fn):
    for option in reversed([
        click.option("--model", required=True, help="The store's adapter checkpoint (directory or Hub repo id)."),
        click.option("--store", default=None, help="Store whose format, tokenization and descriptions to use."),
        click.option("--format", "fmt", type=click.Choice(_FORMATS), default=None,
                     help="How to format the text: a data format (the text is the user turn; default: the store's "
                          "format, raw without --store) or raw (the text as it is)."),
        click.option("--response", default=None, help="With a data format: the assistant turn after the text."),
        click.option("--dtype", default="float32", show_default=True, help="float32 reproduces the store's CPU values."),
        click.option("--device", default="cpu", show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON."),
    ]):
        fn = option(fn)
    return fn


def _open(store):
    if store is None:
        return None
    import featurestore

    return featurestore.open(store)


def register(group: click.Group) -> None:
    @group.command("trace")
    @click.argument("text")
    @_common
    @click.option("--top", default=5, show_default=True, help="Features shown per token.")
    @click.option("--features", "n_features", default=10, show_default=True,
                  help="Features shown with their activations along the text.")
    def trace_command(text, model, store, fmt, response, dtype, device, as_json, top, n_features):
        """Which features fire on TEXT: per token the active features (activation, description), and per
        feature its activations along the text.

        With --store, the text is formatted and tokenized like the store's data (its format, BOS rule and
        max length), and a stored text (--response for its assistant turn) is run padded like its collection
        batch, so it gives exactly the store's rows for it (float32 on the CPU, as collected there). Without
        --store, the text is taken raw (with the tokenizer's BOS)."""
        from featurestore.tracing import trace

        result = trace(text, model, _open(store), response=response, format=fmt, dtype=dtype, device=device)
        if as_json:
            click.echo(json.dumps(result.to_dict(top, n_features), ensure_ascii=False))
            return
        click.echo(f"{len(result)} tokens, {len(result.act)} activations on layers {result.layers}")
        for pos, token in enumerate(result.text):
            shown = ", ".join(f"L{e['layer']}/{e['feature']} {e['act']:.3g}" + (f" ({e['description']})" if e["description"] else "")
                              for e in result.at(pos, top))
            click.echo(f"{pos:5d} {json.dumps(token, ensure_ascii=False):<16} {shown or '-'}")
        click.echo("\nstrongest features (activation along the text):")
        for entry in result.top_features(n_features):
            acts = result.feature_acts(entry["layer"], entry["feature"])
            click.echo(f"  L{entry['layer']}/{entry['feature']:<6} max {entry['max_act']:.3g} at {entry['pos']} "
                       f"on {entry['n_tokens']} tokens  {_spark(acts)}"
                       + (f"  {entry['description']}" if entry["description"] else ""))

    @group.command("steer")
    @click.option("--prompt", required=True, help="The text to run (formatted as --format says).")
    @_common
    @click.option("--feature", "edits", multiple=True, required=True,
                  help="An intervention, repeatable: L/F=0 zeroes feature F of layer L, L/F=2 scales it, "
                       "L=off turns adapter L off, all=off every adapter.")
    @click.option("--max-new-tokens", default=20, show_default=True, help="Tokens generated each way (0: none).")
    @click.option("--sample", is_flag=True, help="Sample instead of greedy decoding (seeded, the same both ways).")
    @click.option("--temperature", default=1.0, show_default=True)
    @click.option("--top-k", default=None, type=int)
    @click.option("--seed", default=0, show_default=True)
    @click.option("--top", default=3, show_default=True, help="Next tokens shown per position.")
    @click.option("--track", multiple=True, help="A token whose probability to show at every position.")
    def steer_command(prompt, model, store, fmt, response, dtype, device, as_json, edits, max_new_tokens, sample,
                      temperature, top_k, seed, top, track):
        """Run the model on --prompt with and without the interventions: the next-token distribution at each
        position (KL divergence, top tokens both ways) and the continuation both ways under the same decoding."""
        from featurestore.intervention import Decoding, parse_edit, steer_text

        if max_new_tokens < 0:
            raise UserError("--max-new-tokens must be 0 or more")
        parsed = [parse_edit(e) for e in edits]
        decoding = Decoding(max_new_tokens, sample, temperature, top_k, seed)
        result = steer_text(prompt, model, parsed, _open(store), response=response, format=fmt, decoding=decoding,
                            top=top, track=list(track), dtype=dtype, device=device)
        if as_json:
            click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
            return
        click.echo(f"interventions: {', '.join(result.edits)}")
        for entry, token in zip(result.positions, result.text):
            base = " ".join(f"{json.dumps(t['token'], ensure_ascii=False)} {t['p_base']:.3f}" for t in entry["base"])
            after = " ".join(f"{json.dumps(t['token'], ensure_ascii=False)} {t['p_edited']:.3f}" for t in entry["edited"])
            tracked = "".join(f"  p({t['token']!r}) {t['p_base']:.4f} -> {t['p_edited']:.4f}" for t in entry.get("tracked", []))
            click.echo(f"{entry['pos']:5d} {json.dumps(token, ensure_ascii=False):<16} KL {entry['kl']:.4f}  "
                       f"base: {base}  edited: {after}{tracked}")
        if max_new_tokens:
            mode = f"sampled (T={temperature}, seed {seed})" if sample else "greedy"
            click.echo(f"\ncontinuation, {mode}, {max_new_tokens} tokens:")
            click.echo(f"  base:   {json.dumps(result.continuation_base, ensure_ascii=False)}")
            click.echo(f"  edited: {json.dumps(result.continuation_edited, ensure_ascii=False)}")


def _spark(acts: list[float]) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    peak = max(acts) or 1.0
    return "".join(bars[min(8, int(round(a / peak * 8)))] if a > 0 else "·" for a in acts[:120])
