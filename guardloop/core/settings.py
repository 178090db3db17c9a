"""All configuration in one class: environment variables (GUARDLOOP_*) over an optional YAML file over defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from guardloop.core.config_file import read_config_file
from guardloop.core.label_definitions import DefinitionsError, load_definitions
from guardloop.core.labels import SAFE_LABEL, parse_label
from guardloop.core.rates import Rate


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GUARDLOOP_", extra="forbid", validate_default=True)

    # Where the YAML file is read from (itself only settable from the environment: GUARDLOOP_CONFIG).
    config: Path | None = None

    # Storage
    data_dir: Path = Path("var")
    registry_dir: Path = Path("models/versions")

    # HTTP service
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_texts: int = Field(64, ge=1, description="most texts in one /classify request")
    max_text_chars: int = Field(4000, ge=1, description="most characters in one text")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="request bodies above this are refused unread")
    admin_token: SecretStr | None = None
    # One log line per request costs the event loop about as much as routing it; /metrics counts requests anyway.
    access_log: bool = Field(False, description="uvicorn's per-request access log")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="level of every logger in `guardloop serve` (guardloop, uvicorn, SQLAlchemy, httpx)"
    )
    metrics_refresh_seconds: float = Field(
        15.0, gt=0, description="how often /metrics' pool and review-queue gauges are read from the database"
    )
    trainer_metrics_port: int = Field(9400, ge=1, le=65535, description="`guardloop trainer` serves /metrics here")

    # Inference
    onnx_threads: int = Field(1, ge=1, description="intra-op threads of the ONNX Runtime session")
    workers: int = Field(
        1, ge=1, le=64, description="`guardloop serve`'s worker processes, each with its own model (service/workers.py)"
    )
    # An inference thread needs the GIL back after each text's forward pass (ONNX Runtime releases it while it
    # runs); while the event loop keeps it busy, Python's default 5 ms switch interval left a core idle for up to
    # 5 ms per text (~4 ms of model here). 0.2 ms carried 15% more texts/s at concurrency 32 and 128 (234 -> 269
    # and 221 -> 255, p99 at 32 213 -> 159 ms; two servers in alternating turns) with the same p50 at
    # concurrency 1; 0.1 ms did as well as 0.2 ms, 0.5 ms about half as much.
    gil_switch_interval_ms: float = Field(
        0.2, gt=0, le=100, description="`guardloop serve`'s Python thread switch interval (sys.setswitchinterval)"
    )
    max_seq_len: int = Field(128, ge=8, le=512)
    batch_max_size: int = Field(32, ge=1, description="most texts the micro-batcher runs in one forward pass")
    # 0 measured best here: texts that arrive while a forward pass runs form the next batch anyway, and a timed
    # wait costs a lone request far more than it saves (p50 4.5 ms at 0 vs 12.3 ms at 2 ms, loopback HTTP).
    batch_max_wait_ms: float = Field(0.0, ge=0, description="longest a text waits for others to join its batch")
    # Work is counted in estimated tokens (characters / 4 + 2, at most max_seq_len per text); the sizes below are
    # measured here (README, "Sharing the service"): one inference thread drains ~6,500-8,500 such tokens/s idle
    # (~2,500-3,800 with the machine shared), and one 128-token text takes ~40 ms shared, which is the longest a
    # one-line caller then waits for a flood's batch to finish.
    batch_max_tokens: int = Field(
        128, ge=8, description="most padded tokens (texts x the longest) in one forward pass; caps a batch's time"
    )
    batch_short_lane: bool = Field(
        True, description="a second inference thread for short texts only: they never wait for a long text's pass"
    )
    # 1.5 x the largest legal request (64 x 128): two clients sending it take turns, half-overlapping, instead of
    # one of them being refused for as long as the other keeps its request queued.
    queue_max_tokens: int = Field(
        12288, ge=1, description="work ahead of a request's last text beyond which it is refused at once (503)"
    )
    registry_poll_seconds: float = Field(5.0, gt=0, description="how often the service checks `current`")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="per-category flag thresholds that override the model card's, e.g. {'self-harm': 0.3}",
    )
    conversation_context_turns: int = Field(
        2, ge=0, le=16, description="earlier user turns classified together with the last one (conversation input)"
    )

    # Response guidance
    guidelines_path: Path | None = Field(None, description="operator's guideline library (YAML); default: built in")
    guidelines_poll_seconds: float = Field(2.0, gt=0, description="how often the guideline file's mtime is checked")

    # Tenant policies (guardloop/core/policy.py): thresholds, review band, guidance, pool opt-in per API-key client
    policy_path: Path | None = Field(None, description="tenant policy file (YAML); unset: one policy, today's rules")
    policy_poll_seconds: float = Field(2.0, gt=0, description="how often the policy files' mtimes are checked")

    # Pool of uncertain traffic and the reviewers' queue (SQLite file under data_dir unless database_url is set)
    database_url: SecretStr | None = Field(
        None, description="postgresql+psycopg://user:pass@host/db or sqlite:///path; unset: <data_dir>/guardloop.db"
    )
    pool_enabled: bool = Field(True, description="log uncertain /classify results (and a sample of the rest)")
    pool_uncertainty_measure: Literal["entropy", "margin"] = Field(
        "entropy", description="entropy: uncertainty above the threshold; margin: top-two gap below pool_margin"
    )
    pool_uncertainty_threshold: float = Field(0.5, ge=0, le=1, description="normalized entropy that counts as unsure")
    pool_margin: float = Field(0.2, ge=0, le=1, description="top-two score gap below which a result counts as unsure")
    pool_sample_rate: float = Field(0.02, ge=0, le=1, description="share of confident results pooled as well")
    pool_queue_size: int = Field(10_000, ge=1, description="results waiting for the writer; beyond it they are dropped")
    pool_batch_size: int = Field(256, ge=1, description="most results written in one transaction")
    pool_flush_seconds: float = Field(0.5, gt=0, description="longest a result waits before its batch is written")
    pool_redact: bool = Field(False, description="replace e-mail addresses, phone numbers and URLs before storing")
    pool_retention_days: float = Field(30, gt=0, description="unlabeled pool items not seen for this long are purged")
    pool_purge_interval_seconds: float = Field(3600, gt=0, description="how often the service runs the purge")
    review_labels_per_item: int = Field(1, ge=1, le=9, description="labels per item; 2+: disagreement is adjudicated")
    review_second_opinion_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="with one label per item: share of items also sent to a second reviewer "
        "(chosen by item id), so reviewer agreement is always measured; the first label still decides",
    )
    review_max_comment_chars: int = Field(2000, ge=0, le=10_000, description="longest reviewer comment accepted")
    # Anchoring: a reviewer shown the model's guess first tends to agree with it, and those labels train the model.
    review_hide_model_guess: bool = Field(
        True, description="the review page shows the model's guess only after the reviewer answers"
    )
    review_definitions_path: Path | None = Field(
        None, description="label definitions for reviewers (YAML, all six labels); default: the team's file"
    )
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict, description="client name -> API key for /classify; empty: no key needed"
    )

    # Abuse limits: token buckets per process ("N/second|minute|hour": a burst of N, then N per period; empty: off).
    # With R replicas a caller gets up to R times these. Behind a proxy, the client address is the proxy's unless
    # uvicorn is told to trust its X-Forwarded-For (FORWARDED_ALLOW_IPS).
    rate_limit_enabled: bool = Field(True, description="switch every rate limit below on or off")
    # Below what the service answers on 2 cores (one-text requests at concurrency 32: ~510/s measured in issue 12,
    # ~740/s idle in `bench peer`), so one caller's requests are refused before they saturate the service: 1,000/s
    # never fired. The tokens limit below counts their work.
    rate_limit_classify_per_ip: str | None = Field("400/second", description="/classify + /v1/moderations per IP")
    rate_limit_classify_per_key: str | None = Field("400/second", description="/classify + /v1/moderations per key")
    rate_limit_review_per_ip: str | None = Field("1200/minute", description="/review* per client IP")
    rate_limit_review_per_token: str | None = Field("600/minute", description="/review* per reviewer token")
    rate_limit_classify_tokens_per_client: str | None = Field(
        "5000/second", description="estimated tokens classified per second per API key (or per IP without keys)"
    )
    rate_limit_auth_failures_per_ip: str | None = Field(
        "20/minute", description="failed authentications (401/403) on /admin/* and /review* per IP"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the API cross-site; empty: CORS closed"
    )

    @field_validator(
        "rate_limit_classify_per_ip",
        "rate_limit_classify_per_key",
        "rate_limit_review_per_ip",
        "rate_limit_review_per_token",
        "rate_limit_classify_tokens_per_client",
        "rate_limit_auth_failures_per_ip",
    )
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return Rate.parse(value).text

    def rate(self, name: str) -> Rate | None:
        """The parsed rate limit setting `name` (e.g. "rate_limit_review_per_ip"); None when off."""
        value = getattr(self, name)
        return Rate.parse(value) if self.rate_limit_enabled and value else None

    # Training
    seed: int = 13

    # LLM variations (any OpenAI-compatible endpoint; none = the embedded SmolLM2 server on loopback)
    llm_base_url: str | None = Field(None, description="e.g. http://127.0.0.1:11434/v1; unset: embedded SmolLM2")
    llm_model: str | None = Field(None, description="model name at the endpoint; unset: the first it lists")
    llm_api_key: SecretStr | None = None
    llm_timeout_seconds: float = Field(60.0, gt=0, description="longest wait for one LLM answer")
    llm_retries: int = Field(2, ge=0, le=10, description="attempts after a failed first one (exponential backoff)")
    llm_backoff_seconds: float = Field(1.0, ge=0, description="wait before the first retry; doubles each time")
    llm_variations: int = Field(5, ge=1, le=20, description="variations asked for per labeled text (k)")
    llm_temperature: float = Field(0.8, ge=0, le=2)
    llm_rounds: int = Field(
        3, ge=1, le=10, description="requests per labeled text at most: another while fewer than its budget passed"
    )
    llm_compose_examples: int = Field(
        3,
        ge=0,
        le=8,
        description="other labeled texts of its class an item short of its budget composes new posts from; 0: off",
    )
    llm_max_tokens: int = Field(256, ge=16, le=4096, description="longest LLM answer, in tokens")
    llm_consistency_threshold: float = Field(
        0.8, gt=0, le=1, description="drop a variation the current model puts in another class with this confidence"
    )
    llm_threads: int = Field(1, ge=1, description="CPU threads of the embedded LLM server")
    llm_verify: bool = Field(
        True, description="every variation must pass the verifier (trainer/variations/verifier.py) to be kept"
    )
    # deficit: the k-per-item budget goes to the classes the training set has fewest of, none to the largest
    # (trainer/variations/budget.py); uniform: k for every item, as in the paper.
    llm_variation_budget: Literal["deficit", "uniform"] = Field("deficit", description="where variations go")

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        checked: dict[str, float] = {}
        for raw, threshold in value.items():
            label = parse_label(raw)
            if label == SAFE_LABEL:
                raise ValueError(f"{SAFE_LABEL!r} is never flagged, so it takes no threshold; remove it")
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold of {label!r} is {threshold}; thresholds must lie in 0..1")
            checked[label] = threshold
        return checked

    # Active-learning cycle (trainer)
    # rare-cluster: cluster's spread plus quotas by predicted class toward the classes least labeled so far, so the
    # rare critical classes (emergencies) are acquired instead of the traffic's skew; `cluster` is the paper's.
    cycle_strategy: Literal[
        "rare-cluster", "cluster", "random", "topn", "coreset", "small-text-breaking-ties", "small-text-kmeans"
    ] = Field("rare-cluster", description="how pool items are picked for labeling (trainer/strategies.py)")
    cycle_budget: int = Field(20, ge=1, le=10_000, description="labels requested per cycle")
    cycle_clusters: int | None = Field(None, ge=2, description="k-means K for the cluster strategies (default: budget)")
    cycle_max_pool: int = Field(20_000, ge=10, description="most recent unrequested pool items a cycle considers")
    cycle_label_deadline_hours: float = Field(24.0, gt=0, description="after this, a cycle trains on the labels it has")
    cycle_min_labels: int = Field(1, ge=1, description="fewest new labels worth retraining for")
    cycle_interval_minutes: float | None = Field(60.0, gt=0, description="run the cycle every N minutes")
    cycle_cron: str | None = Field(None, description="crontab schedule instead of the interval, e.g. '0 3 * * *'")
    # Drift and the pool map (trainer/monitor.py, trainer/pool_map.py): the trainer checks on its own schedule.
    drift_check_minutes: float | None = Field(
        60.0, gt=0, description="compare recent traffic with the model's training data every N minutes; unset: off"
    )
    drift_window_items: int = Field(
        500, ge=30, le=5000, description="newest randomly sampled pool items a drift check compares"
    )
    drift_alpha: float = Field(0.01, gt=0, lt=0.5, description="drift test's false-alarm rate (permutation threshold)")
    drift_starts_cycle: bool = Field(True, description="a drifted check starts a cycle now (once per served version)")
    pool_map_items: int = Field(
        5000, ge=0, le=50_000, description="newest pool items the trainer's pool map draws after each check; 0: none"
    )
    ops_dir: Path | None = Field(
        None, description="where the trainer writes the pool map the service shows at /ops; unset: <registry>/.ops"
    )

    @field_validator("review_definitions_path")
    @classmethod
    def _check_definitions(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                load_definitions(value)
            except DefinitionsError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("cycle_cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        # Checked here, not when the trainer schedules its first cycle: a typo stops every command at once.
        if value is None or not value.strip():
            return None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a crontab line ({exc}); write 5 fields, e.g. '0 3 * * *'") from None
        return value.strip()

    cycle_epochs: int = Field(10, ge=1, le=100)
    cycle_oracle_file: Path | None = Field(None, description="labeled file that answers label requests (simulation)")
    # Before each training, out-of-fold predictions over the reviewed labels flag likely mislabels (cleanlab); a
    # flagged label is withheld and its item goes back to the queue for a second reviewer (trainer/label_check.py).
    label_check: bool = Field(True, description="flag suspected mislabels before each training")
    label_check_folds: int = Field(5, ge=2, le=20, description="cross-validation folds of the label check")
    label_check_max_share: float = Field(
        0.2, ge=0, le=1, description="most of the single-reviewer labels one check may send back"
    )
    train_data: list[Path] = Field(default_factory=list, description="labeled files always trained on (default: seed)")
    eval_data: Path | None = Field(None, description="fixed gate evaluation set, never trained on (default: seed eval)")
    gate_max_macro_f1_drop: float = Field(0.01, ge=0, le=1, description="largest macro-F1 drop still promoted")
    gate_max_recall_drop: float = Field(0.05, ge=0, le=1, description="largest per-class recall drop still promoted")
    # A drop blocks a candidate only when the paired bootstrap interval of (current - candidate) lies above zero:
    # on a few dozen eval items one text moves a recall by 5-10 points, and one text must not decide.
    gate_confidence: float = Field(0.95, ge=0.5, lt=1, description="the gate's two-sided paired-bootstrap interval")
    gate_resamples: int = Field(1000, ge=100, le=100_000, description="paired-bootstrap resamples per gate decision")
    gold_share: float = Field(
        0.1, ge=0, lt=1, description="share of reviewed items (by id hash) kept as the gold gate set, never trained on"
    )
    gold_min_per_class: int = Field(
        10, ge=1, description="gold items each class needs before the gate judges on gold instead of eval_data"
    )
    # Roll-out of a candidate that passed the gate (README, "Rolling out a new model"): shadow, canary steps, current.
    rollout_shadow: bool = Field(
        False, description="a cycle publishes a candidate that passed the gate as a shadow, not as current"
    )
    shadow_share: float = Field(1.0, ge=0, le=1, description="share of live texts the shadow model also scores")
    shadow_queue_size: int = Field(256, ge=1, description="texts waiting for the shadow; more are dropped, counted")
    shadow_quiet_ms: float = Field(
        10.0, ge=0, le=1000, description="pause in the traffic the shadow waits for before it scores (at most 1 s)"
    )
    shadow_min_texts: int = Field(500, ge=1, description="shadow-scored texts (all replicas) before promotion")
    shadow_max_disagreement: float = Field(
        0.05, ge=0, le=1, description="largest share of texts, overall and per class, the shadow may label otherwise"
    )
    shadow_min_reviewed: int = Field(
        10, ge=1, description="settled disagreements that can promote (or reject) a shadow outside its bounds"
    )
    shadow_review_priority: float = Field(10.0, description="review-queue priority of a shadow disagreement")
    canary_steps: list[float] = Field(
        default_factory=lambda: [0.05, 0.25, 0.5, 1.0], description="canary shares of traffic, raised in this order"
    )
    canary_by: Literal["client", "request"] = Field("client", description="canary routing: stable per client or not")
    canary_min_requests: int = Field(200, ge=1, description="canary requests (all replicas) per step before judging")
    canary_max_flag_rate_increase: float = Field(0.05, ge=0, le=1, description="canary flag rate above the stable's")
    canary_max_error_rate: float = Field(0.01, ge=0, le=1, description="canary errors per request above the stable's")
    canary_max_latency_ratio: float = Field(2.0, ge=1, description="canary mean request time over the stable's")
    rollout_check_seconds: float = Field(
        5.0, gt=0, description="how often a replica stores its roll-out tallies and judges the canary"
    )

    @field_validator("canary_steps")
    @classmethod
    def _check_canary_steps(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < share <= 1 for share in value) or value != sorted(set(value)):
            raise ValueError(f"{value} must be rising shares in (0, 1], e.g. [0.05, 0.25, 1.0]")
        return value

    base_model: Path | None = Field(
        None, description="student base: a local Hugging Face encoder directory (default: all-MiniLM-L6-v2)"
    )
    teacher: str | None = Field(None, description="distill from 'mpnet' or a local encoder directory (default: none)")
    # A cycle's (and the bootstrap model's) student as the weight average of this many fine-tunes from one start
    # (trainer/averaging.py): steadier from seed to seed, N times the training time. Three: on the paper's budget
    # it beat one fine-tune on dev (84.2 vs 81.1) and on held-out posts (74.7 vs 73.5, README), for 3x the time.
    train_average_of: int = Field(3, ge=1, le=10, description="fine-tunes averaged into each trained student")
    # The pool is the deployment's own unlabeled traffic: the teacher soft-labels it for the student. Distilling
    # costs about 0.4 s of one core per text over ten epochs, so a cycle takes the newest few thousand.
    teacher_unlabeled_max: int = Field(
        4000, ge=0, description="newest pool texts the teacher soft-labels in a cycle (0: training texts only)"
    )

    @field_validator("base_model", "teacher", mode="before")
    @classmethod
    def _check_model_dir(cls, value: Path | str | None) -> Path | str | None:
        # Only that the directory is there: trainer/base_models.py checks what is in it before training.
        if value is None or not str(value).strip():
            return None
        if value == "mpnet" or Path(value).expanduser().is_dir():
            return value
        raise ValueError(f"{value}: no such directory; give a local Hugging Face model directory")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        import os

        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_path = os.environ.get("GUARDLOOP_CONFIG")
        if yaml_path:
            read_config_file(yaml_path)  # a missing, unreadable or broken file is one clear ConfigFileError
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)

    @property
    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None

    @property
    def ops_dir_path(self) -> Path:
        """The pool map's directory: the registry volume is the one place both the trainer and every service
        replica see (a dot-name: the registry never takes it for a version)."""
        return self.ops_dir or self.registry_dir / ".ops"

    @property
    def pool_map_path(self) -> Path:
        """The latest pool map: drawn by the trainer, shown by the service (GET /admin/ops/pool-map.png)."""
        return self.ops_dir_path / "pool-map.png"

    @property
    def database_url_value(self) -> str:
        """The configured database, or the SQLite file under the data directory."""
        if self.database_url:
            # model_copy(update=...) skips validation and may leave a plain string here
            url = self.database_url
            return url.get_secret_value() if isinstance(url, SecretStr) else str(url)
        return f"sqlite:///{(self.data_dir / 'guardloop.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
