"""LLM judges over the store: feature classification and auto-interp with detection scoring.

    from featurestore.interp import JudgeSettings, classify, autointerp, descriptions
    classify(store, JudgeSettings(model="gpt-5-mini"), n_per_layer=250)
    autointerp(store, JudgeSettings(model="gpt-4o-mini", base_url="http://localhost:8000/v1"), n_per_layer=100)

Any OpenAI-compatible endpoint; the key comes from OPENAI_API_KEY or ./.env. Results land in
``STORE/interp/<table>/run=<run_id>/`` as they complete and are read through the views
``classifications``, ``explanations``, ``detection_scores``, ``detection_examples``, ``scorer_scores``,
``scorer_examples`` (fuzzing and embedding), ``interp_requests`` and ``interp_runs``; ``feature_scores`` puts
every scorer's per-feature result side by side.
"""
from .autointerp import autointerp
from .classify import classify
from .client import JudgeSettings
from .compare import feature_scores
from .evidence import EvidenceSettings
from .queries import descriptions, requests

__all__ = ["autointerp", "classify", "descriptions", "requests", "feature_scores", "JudgeSettings", "EvidenceSettings"]
