"""The one classification path behind every route that classifies (/classify, /v1/moderations).

Routes turn their own request shape into a list of texts and call `classify_texts`; limits, errors and
anything that must happen for every classified text (logging, metrics) live here, once.

The model reads each text's canonical form (guardloop.core.canonical: fullwidth letters, bidi overrides,
invisible characters, look-alike letters and leetspeak undone), so a disguised text scores like its plain
form; the pool keeps the text as it was sent. Text that cannot be encoded (a lone surrogate from a JSON
escape) is a 422 here, before it can reach the tokenizer or the database.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from guardloop.models.onnx_model import Verdict
from guardloop.service.admission import Overloaded
from guardloop.service.batcher import NoModelLoaded, TextRejected
from guardloop.service.decisions import AppliedPolicy, Decision, decide, record_decisions
from guardloop.service.model_holder import LoadedModel

from guardloop.core import telemetry
from guardloop.core.canonical import canonical_text, text_problem

log = logging.getLogger(__name__)

# Above this many characters a request's texts are examined in a worker thread: 64 texts of 4,000 characters took
# 30-40 ms of pure Python here, a stall every other caller's request would wait out in the event loop.
EXAMINE_IN_THREAD_CHARS = 20_000


@dataclass(frozen=True)
class ClassifiedTexts:
    texts: list[str]  # as sent
    canonical: list[str]  # what the model read, in the order of `texts`
    verdicts: list[Verdict]  # in the order of `texts`
    model: LoadedModel  # the one version that answered all of them
    # The caller's tenant policy decided each verdict's flags (service/decisions.py); in the order of `texts`.
    decisions: list[Decision]
    policy: AppliedPolicy


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def check_limits(texts: list[str], max_texts: int, max_chars: int) -> list[str]:
    """Refuse what cannot or must not be classified; return the canonical form of each text."""
    if not texts:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "no text to classify: send at least one text")
    if len(texts) > max_texts:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"too many texts: {len(texts)} sent, at most {max_texts} per request; split the request",
        )
    canonical = []
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise _unprocessable(f"text {i} has {len(text)} characters, at most {max_chars} allowed; shorten it")
        problem = text_problem(text)
        if problem is not None:
            raise _unprocessable(f"text {i} {problem}")
        readable = canonical_text(text)
        if not readable.strip():
            invisible = " (it has only invisible characters)" if text.strip() else ""
            raise _unprocessable(f"text {i} is empty{invisible}: send some words")
        canonical.append(readable)
    return canonical


async def classify_texts(request: Request, texts: list[str], *, pooled: int | None = None) -> ClassifiedTexts:
    """Check the limits, classify `texts` through the micro-batcher, and return one verdict per text.

    The first `pooled` texts (default: all) are offered to the pool of uncertain traffic; pass fewer when
    the others are not user messages (a conversation's context window).
    """
    settings = request.app.state.settings
    batcher = request.app.state.batcher
    client = client_key(request)
    work_limit = getattr(request.app.state, "work_limit", None)
    if work_limit is not None and len(texts) <= settings.max_texts:
        # 429 + Retry-After past the client's tokens/s, before its texts are examined (~0.5 ms per long text)
        work_limit.check(client, batcher.cost(texts))
    if sum(map(len, texts)) > EXAMINE_IN_THREAD_CHARS:  # ~0.5 ms per long text: the loop serves others meanwhile
        canonical = await asyncio.to_thread(check_limits, texts, settings.max_texts, settings.max_text_chars)
    else:
        canonical = check_limits(texts, settings.max_texts, settings.max_text_chars)  # what the model reads
    rollout = getattr(request.app.state, "rollout", None)  # a canary answers its share (service/rollout_monitor.py)
    try:
        probs, model = await (rollout.predict(canonical, client) if rollout else batcher.predict(canonical, client))
    except NoModelLoaded as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model loaded yet; retry shortly") from exc
    except Overloaded as exc:
        telemetry.record_refused("overloaded")
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": str(math.ceil(exc.retry_after))}
        ) from None
    except TextRejected as exc:
        telemetry.record_refused("text_failed")
        # Only the exception's type: its message may quote the text, which is never logged.
        log.warning("text %s of a request failed alone in the model (%s); answered 422", exc.index, exc.kind)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    policy = tenant_policy(request)
    thresholds = model.classifier.thresholds
    decided = [decide(model.classifier.verdict(row), thresholds, policy) for row in probs]
    classified = ClassifiedTexts(texts, canonical, [v for v, _ in decided], model, [d for _, d in decided], policy)
    callers_texts = len(texts) if pooled is None else pooled
    telemetry.record_verdicts(classified.verdicts[:callers_texts])
    record_decisions(policy, classified.decisions[:callers_texts])
    _offer_to_pool(request, classified, callers_texts)
    if rollout is not None:  # the canary's flag tally, a copy for the shadow (never waits); texts kept if opted in
        client_id = getattr(request.state, "client_id", None)
        mine = slice(callers_texts)
        rollout.observe(model, texts[mine], canonical[mine], classified.verdicts[mine], client_id, store=policy.pool)
    return classified


def client_key(request: Request) -> str:
    """Who shares batches and work limits: the API key's client name when keys are configured, else the
    client address (a self-declared X-Client-Id would let one caller take as many shares as it likes)."""
    client_id = getattr(request.state, "client_id", None)
    if request.app.state.settings.api_keys and client_id:
        return f"key:{client_id}"
    return f"ip:{request.client.host if request.client else 'unknown'}"


def tenant_policy(request: Request) -> AppliedPolicy:
    """The caller's tenant policy, by API-key client name. Without API keys the client name is self-declared
    (X-Client-Id), and a caller must not pick a looser policy by a header: everyone gets the default one."""
    client = getattr(request.state, "client_id", None) if request.app.state.settings.api_keys else None
    return request.app.state.policies.current.for_client(client)


def _offer_to_pool(request: Request, classified: ClassifiedTexts, count: int) -> None:
    """Queue the results the pool wants (a tenant that opted out: none); never waits and never fails the request."""
    pool = getattr(request.app.state, "pool", None)
    if pool is None or count <= 0 or not classified.policy.pool:
        return
    try:
        pool.observe(
            classified.texts[:count],
            classified.verdicts[:count],
            classified.model.version,
            getattr(request.state, "client_id", None),
            policy=classified.policy,
            decisions=classified.decisions[:count],
        )
    except Exception:
        log.exception("pool logging failed; the request is answered anyway")
