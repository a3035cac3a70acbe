"""``featurestore classify`` and ``featurestore autointerp`` (LLM judges), and ``export classifications|autointerp``."""
from __future__ import annotations

import click


def _judge_options(default_model: str):
    """Options shared by both judges: endpoint, concurrency, sampling, evidence, run control."""
    def decorate(function):
        options = [
            click.argument("store", type=click.Path(exists=True, file_okay=False)),
            click.option("--model", default=default_model, show_default=True, help="Judge model name at the endpoint."),
            click.option("--base-url", default=None,
                         help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 "
                              "(Ollama), https://openrouter.ai/api/v1 [env OPENAI_BASE_URL, else api.openai.com]. "
                              "The key comes from OPENAI_API_KEY or ./.env."),
            click.option("--concurrency", type=click.IntRange(1), default=32, show_default=True, help="Requests in flight."),
            click.option("--timeout", type=click.FloatRange(0.1), default=120.0, show_default=True,
                         help="Seconds for each whole request (from sending to the last byte of the answer)."),
            click.option("--max-wait", type=click.FloatRange(0), default=60.0, show_default=True,
                         help="Longest wait between tries (backoff, Retry-After); an endpoint asking to wait longer "
                              "ends the question as an error (rerun later to retry it)."),
            click.option("--budget", type=click.FloatRange(0.1), default=600.0, show_default=True,
                         help="Longest one question may take, all tries and waits included; then it is an error."),
            click.option("--max-tokens", type=click.IntRange(16), default=4096, show_default=True,
                         help="Output token limit per request (sent as max_completion_tokens to reasoning models)."),
            click.option("--temperature", type=float, default=None, help="Sampling temperature (default: the endpoint's)."),
            click.option("--attempts", type=click.IntRange(1), default=3, show_default=True,
                         help="Tries per question when the answer is invalid; then the feature is recorded as an error."),
            click.option("--n-per-layer", type=click.IntRange(1), default=None,
                         help="Features sampled per layer (seeded; a larger value extends an earlier sample)."),
            click.option("--min-freq", type=click.FloatRange(0), default=1e-7, show_default=True,
                         help="Only sample features with activation_freq at least this."),
            click.option("--min-examples", type=click.IntRange(1), default=None,
                         help="Only sample features with at least this many activations."),
            click.option("--layers", default=None, help="Layers to sample from, e.g. 0,3,5-7 (default: all)."),
            click.option("--features", default=None, help="Exactly these features instead of a sample: L:F,L:F,..."),
            click.option("--source", type=click.Choice(["transcoder", "neuron"]), default="transcoder", show_default=True),
            click.option("--seed", type=int, default=42, show_default=True, help="Seed of the sample and of example choice."),
            click.option("--before", type=click.IntRange(0), default=50, show_default=True, help="Window tokens before."),
            click.option("--after", type=click.IntRange(0), default=20, show_default=True, help="Window tokens after."),
            click.option("--n-top", type=click.IntRange(1), default=10, show_default=True, help="Top examples shown."),
            click.option("--n-lower", type=click.IntRange(0), default=5, show_default=True,
                         help="Examples from lower activation quantiles shown."),
            click.option("--rerun", is_flag=True, help="Start a new run instead of resuming the last one with these settings."),
            click.option("--run-id", default=None, help="Resume (or create) exactly this run."),
            click.option("--dry-run", is_flag=True, help="Print the prompts of two features and the number of requests; call nothing."),
        ]
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


def _settings(kwargs: dict):
    from featurestore.interp import EvidenceSettings, JudgeSettings

    judge = JudgeSettings(model=kwargs.pop("model"), base_url=kwargs.pop("base_url"),
                          concurrency=kwargs.pop("concurrency"), timeout_s=kwargs.pop("timeout"),
                          max_wait_s=kwargs.pop("max_wait"), budget_s=kwargs.pop("budget"),
                          max_output_tokens=kwargs.pop("max_tokens"), temperature=kwargs.pop("temperature"),
                          answer_attempts=kwargs.pop("attempts"))
    evidence = EvidenceSettings(before=kwargs.pop("before"), after=kwargs.pop("after"), n_top=kwargs.pop("n_top"),
                                n_lower=kwargs.pop("n_lower"))
    return judge, evidence


def _report(result) -> None:
    if hasattr(result, "prompts"):  # dry run
        click.echo(result.text())
        return
    state = "resumed" if result.resumed else "new"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items())) or "nothing to do"
    click.echo(f"run {result.run_id} ({state}): {result.n_selected} features selected, {result.n_already_done} "
               f"already done; this invocation: {counts}")
    click.echo(f"requests {result.n_requests}, prompt tokens {result.prompt_tokens}, "
               f"completion tokens {result.completion_tokens}")
    if result.report:
        click.echo(result.report)
    if result.n_failed:
        click.echo(f"{result.n_failed} of {result.n_selected} features ended in error (status=error rows); "
                   "rerun the same command to retry them")
        click.get_current_context().exit(1)


def register(group: click.Group) -> None:
    @group.command("classify")
    @_judge_options("gpt-5-mini")
    def classify_command(store, n_per_layer, min_examples, **kwargs):
        """Classify a sample of features (language / domain / reasoning / uninterpretable) with an LLM judge.

        One row per feature lands in STORE/interp/classifications as it completes (view: classifications).
        Rerunning the same command resumes; errors are rows with status=error and are retried on resume.
        Exits 1 when any feature ends in error (the count is the last line), 2 on bad options or state.
        """
        import featurestore as fs
        from featurestore.interp import classify

        judge, evidence = _settings(kwargs)
        result = classify(fs.open(store), judge, n_per_layer=n_per_layer or 250, min_examples=min_examples or 5,
                          evidence=evidence, **kwargs)
        _report(result)

    @group.command("autointerp")
    @_judge_options("gpt-4o-mini")
    @click.option("--n-test", type=click.IntRange(1), default=25, show_default=True,
                  help="Held-out positives per condition (top, lower); as many matched negatives. At 25, a feature's "
                       "balanced accuracy of 0.8 has a 95% interval about 0.22 wide (0.5 wide at 5).")
    @click.option("--control/--no-control", default=True, show_default=True,
                  help="Also score each feature with another feature's description (chance baseline).")
    @click.option("--scorers", default="detection", show_default=True,
                  help="Comma-separated: detection (which excerpts activate), fuzzing (are the marked tokens the "
                       "activating ones), embedding (AUROC of description-to-excerpt similarity; needs --embeddings-model).")
    @click.option("--explainer-model", default=None, help="Model that writes descriptions (default: --model).")
    @click.option("--explainer-base-url", default=None, help="Its endpoint (default: --base-url).")
    @click.option("--scorer-model", default=None, help="Model that answers detection and fuzzing (default: the explainer).")
    @click.option("--scorer-base-url", default=None, help="Its endpoint (default: the explainer's).")
    @click.option("--embeddings-model", default=None, help="OpenAI-compatible embeddings model for the embedding scorer.")
    @click.option("--embeddings-base-url", default=None, help="Its endpoint (default: the scorer's).")
    @click.option("--rescore-from", default=None, metavar="RUN_ID|FILE.json",
                  help="Score existing descriptions instead of writing new ones: an earlier autointerp run of this store, "
                       "or a JSON file in the original auto-interp output format. No explanation is requested.")
    def autointerp_command(store, n_per_layer, min_examples, n_test, control, scorers, explainer_model,
                           explainer_base_url, scorer_model, scorer_base_url, embeddings_model, embeddings_base_url,
                           rescore_from, **kwargs):
        """Describe features in 10-15 words and score each description on held-out excerpts.

        Scorers: detection (default), fuzzing and embedding (--scorers). The explainer, the scorer and the
        embeddings model may be different models at different endpoints; every row records the one that answered.
        Results land in STORE/interp/ (views explanations, detection_scores, detection_examples, scorer_scores,
        scorer_examples); the summary gives means with 95% bootstrap CIs, `autointerp-scores` the per-feature
        scores side by side. Rerunning the same command resumes without repeating an answered request.
        Exits 1 when any feature ends in error (the count is the last line), 2 on bad options or state.
        """
        import dataclasses

        import featurestore as fs
        from featurestore.interp import autointerp

        judge, evidence = _settings(kwargs)
        judge = dataclasses.replace(judge, model=explainer_model or judge.model,
                                    base_url=explainer_base_url or judge.base_url)
        scorer = None
        if scorer_model or scorer_base_url:
            scorer = dataclasses.replace(judge, model=scorer_model or judge.model, base_url=scorer_base_url or judge.base_url)
        embeddings = None
        if embeddings_model:
            embeddings = dataclasses.replace(scorer or judge, model=embeddings_model,
                                             base_url=embeddings_base_url or (scorer or judge).base_url)
        evidence.n_test_top = evidence.n_test_lower = n_test
        result = autointerp(fs.open(store), judge, n_per_layer=n_per_layer or 100, min_examples=min_examples,
                            evidence=evidence, control=control, scorers=scorers, scorer=scorer, embeddings=embeddings,
                            descriptions=rescore_from, **kwargs)
        _report(result)

    @group.command("autointerp-scores")
    @click.argument("store", type=click.Path(exists=True, file_okay=False))
    @click.option("--run", "run_id", default=None, help="Run id (default: the latest autointerp run).")
    @click.option("--out", default=None, type=click.Path(dir_okay=False),
                  help="Write CSV here instead of printing a table.")
    def autointerp_scores_command(store, run_id, out):
        """Per-feature scores of every scorer side by side, each with its 95% interval.

        Columns <scorer>_<condition>_<metric>: balanced accuracy (detection, fuzzing) or AUROC (embedding), with
        _ci_low/_ci_high over the feature's own test items; empty where a scorer did not run or failed.
        """
        import featurestore as fs
        from featurestore.interp import feature_scores
        from featurestore.interp.compare import format_feature_scores

        table = feature_scores(fs.open(store), run_id)
        if out:
            table.write_csv(out)
            click.echo(out)
            return
        click.echo(format_feature_scores(table))


def register_export(export_group: click.Group) -> None:
    """Adds ``export classifications`` and ``export autointerp`` to the ``export`` group."""

    @export_group.command("classifications")
    @click.argument("store", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", default="feature_classifications.json", show_default=True, type=click.Path(dir_okay=False))
    @click.option("--run", "run_id", default=None, help="Run id (default: the latest classify run).")
    def export_classifications_command(store, out, run_id):
        """feature_classifications.json in the original schema (successful rows of one run)."""
        import featurestore as fs
        from exporters.interp_json import export_classifications

        path = export_classifications(fs.open(store), out, run_id)
        click.echo(str(path))

    @export_group.command("autointerp")
    @click.argument("store", type=click.Path(exists=True, file_okay=False))
    @click.option("--out", default="autointerp.json", show_default=True, type=click.Path(dir_okay=False))
    @click.option("--run", "run_id", default=None, help="Run id (default: the latest autointerp run).")
    def export_autointerp_command(store, out, run_id):
        """autointerp.json in the original schema, plus balanced accuracy, F1, control scores and CIs."""
        import featurestore as fs
        from exporters.interp_json import export_autointerp

        path = export_autointerp(fs.open(store), out, run_id)
        click.echo(str(path))

