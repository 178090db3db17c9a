"""Tenant policies: the file and its checks, the decision rule, hot reload, per-tenant answers, metrics and pool rows,
and `guardloop calibrate --tenant`, on a real ONNX model (tests/keyword_onnx.py) behind the real app."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from guardloop.models.onnx_model import Verdict
from guardloop.service.app import create_app
from guardloop.service.decisions import AppliedPolicy, decide
from guardloop.service.policy_store import PolicyStore
from prometheus_client import REGISTRY
from pydantic import SecretStr
from typer.testing import CliRunner

from guardloop.core.guidance import DEFAULT_LIBRARY_PATH
from guardloop.core.labels import HARMFUL_LABELS, LABELS
from guardloop.core.policy import PolicyError, load_policy_file
from guardloop.core.settings import Settings
from guardloop.storage import REVIEW_BAND, Database, PoolRepository, ReviewRepository
from tests.conftest import wait_for
from tests.keyword_onnx import publish_keyword_model

# Mean-pooled keyword weights: "i feel so sad today" scores self-harm ~0.33, "I want to die" ~1.0.
KEYWORDS = {"die": ("self-harm", 150.0), "sad": ("self-harm", 12.0), "landlord": ("legal-advice", 150.0)}
BORDERLINE = "i feel so sad today"
LANDLORD = "my landlord kept my deposit"
KEYS = {"kids-app": "sk-test-kids-0123456789", "bank-app": "sk-test-bank-0123456789", "other-app": "sk-other-01234567"}
POLICY = {
    "version": "2026-11-29.1",
    "tenants": {
        "kids": {"clients": ["kids-app"], "thresholds": {"self-harm": 0.3}, "guidelines": "kids.yaml"},
        "bank": {"clients": ["bank-app"], "review": {"self-harm": 0.2}, "ignore": ["legal advice"], "pool": False},
    },
}


def write_yaml(path: Path, data: object) -> Path:
    temporary = path.with_suffix(".tmp")  # atomic, as an editor or a ConfigMap swap writes it
    temporary.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data, "utf-8")
    os.replace(temporary, path)
    return path


def write_policy(folder: Path, policy: dict = POLICY) -> Path:
    library = yaml.safe_load(DEFAULT_LIBRARY_PATH.read_text(encoding="utf-8")) | {"version": "kids-1"}
    write_yaml(folder / "kids.yaml", library)
    return write_yaml(folder / "policy.yaml", policy)


def auth(client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[client]}"}


@pytest.fixture
def tenant_settings(settings: Settings, registry, tmp_path: Path) -> Settings:
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    return settings.model_copy(
        update={
            "api_keys": {name: SecretStr(key) for name, key in KEYS.items()},
            "policy_path": write_policy(tmp_path),
            "policy_poll_seconds": 0.05,
            "pool_flush_seconds": 0.05,
        }
    )


@pytest.fixture
def client(tenant_settings: Settings):
    with TestClient(create_app(tenant_settings)) as test_client:
        yield test_client


def classify(client: TestClient, who: str, text: str) -> dict:
    response = client.post("/classify", json={"text": text}, headers=auth(who))
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------------------ the file


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"version": ""}, "version: String should have at least 1 character"),
        (
            {"tenants": {"kids": {"clients": ["a"], "thresholds": {"self-harm": 1.5}}}},
            "threshold of 'self-harm' is 1.5",
        ),
        ({"tenants": {"kids": {"clients": ["a"], "thresholds": {"violence": 0.3}}}}, "unknown category 'violence'"),
        ({"tenants": {"kids": {"clients": ["a"], "ignore": ["not-harmful"]}}}, "'not-harmful' is never flagged"),
        (
            {"tenants": {"kids": {"clients": ["a"], "thresholds": {"self-harm": 0.3}, "review": {"self-harm": 0.4}}}},
            "review band of 'self-harm' starts at 0.4, not below its threshold 0.3",
        ),
        (
            {"tenants": {"kids": {"clients": ["a"], "ignore": ["self-harm"], "thresholds": {"self-harm": 0.3}}}},
            "self-harm both ignored and given a threshold",
        ),
        ({"tenants": {"a": {"clients": ["x"]}, "b": {"clients": ["x"]}}}, "client 'x' is in tenants a and b"),
        ({"tenants": {"Kids App": {"clients": ["x"]}}}, "tenant name 'Kids App'"),
        ({"tenants": {"default": {"clients": ["x"]}}}, "(not 'default')"),
        ({"tenants": {"kids": {}}}, "tenants.kids.clients: list the API-key client names"),
        ({"tenants": {"kids": {"clients": ["a"], "treshold": {}}}}, "tenants.kids.treshold: Extra inputs"),
        ({"default": {"clients": ["a"]}}, "the default policy covers every other caller"),
    ],
)
def test_a_policy_file_mistake_names_the_place_and_what_to_fix(tmp_path, change, fragment):
    path = write_yaml(tmp_path / "policy.yaml", {"version": "1"} | change)
    with pytest.raises(PolicyError) as raised:
        load_policy_file(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert fragment in str(raised.value)


def test_not_yaml_and_not_a_mapping_are_refused_with_the_place(tmp_path):
    with pytest.raises(PolicyError, match="not valid YAML at line 3"):
        load_policy_file(write_yaml(tmp_path / "p.yaml", "version: 1\ntenants: [a\n"))
    with pytest.raises(PolicyError, match="expected a mapping"):
        load_policy_file(write_yaml(tmp_path / "p.yaml", "- a\n"))
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy_file(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ the rule


def verdict(**scores: float) -> Verdict:
    full = dict.fromkeys(LABELS, 0.0) | {label.replace("_", "-"): value for label, value in scores.items()}
    flagged = tuple(sorted((c for c in HARMFUL_LABELS if full[c] >= 0.5), key=lambda c: -full[c]))
    return Verdict("x", full, 0.5, 0.5, bool(flagged), flagged)


MODEL_THRESHOLDS = dict.fromkeys(LABELS, 0.5)


def test_the_plain_default_policy_is_the_verdicts_own_flags():
    plain = AppliedPolicy("default", "builtin")
    flagged = verdict(self_harm=0.7, medical_advice=0.55)
    same, decision = decide(flagged, MODEL_THRESHOLDS, plain)
    assert same is flagged
    assert decision.decision == "block"
    assert decision.categories == {
        c: "block" if c in ("self-harm", "medical-advice") else "allow" for c in HARMFUL_LABELS
    }
    assert decide(verdict(self_harm=0.4), MODEL_THRESHOLDS, plain)[1].decision == "allow"


def test_thresholds_band_and_ignored_categories():
    policy = AppliedPolicy(
        "kids",
        "1",
        thresholds={"self-harm": 0.3},
        review_from={"legal-advice": 0.2},
        ignored=frozenset({"medical-advice"}),
    )
    seen, decision = decide(verdict(self_harm=0.31, legal_advice=0.35, medical_advice=0.9), MODEL_THRESHOLDS, policy)
    assert decision.categories["self-harm"] == "block"  # the tenant's 0.3, not the model's 0.5
    assert decision.categories["legal-advice"] == "review"  # 0.2 <= 0.35 < 0.5 (the model's threshold)
    assert decision.categories["medical-advice"] == "allow"  # ignored, however high
    assert decision.decision == "block"
    assert seen.flagged_categories == ("self-harm",) and seen.flagged
    in_band = decide(verdict(legal_advice=0.35), MODEL_THRESHOLDS, policy)[1]
    assert (in_band.decision, in_band.review_categories) == ("review", ("legal-advice",))
    assert in_band.closeness == pytest.approx((0.35 - 0.2) / (0.5 - 0.2))
    assert decide(verdict(legal_advice=0.19), MODEL_THRESHOLDS, policy)[1].decision == "allow"  # below the band
    assert decide(verdict(legal_advice=0.5), MODEL_THRESHOLDS, policy)[1].decision == "block"  # the threshold itself


# ------------------------------------------------------------------------------------------ answers per tenant


def test_two_api_keys_with_different_policies_get_different_decisions_for_the_same_text(client):
    kids, bank, other = (classify(client, who, BORDERLINE) for who in ("kids-app", "bank-app", "other-app"))
    assert kids["results"][0]["scores"] == bank["results"][0]["scores"] == other["results"][0]["scores"]
    assert (kids["policy"], kids["policy_version"]) == ("kids", "2026-11-29.1")
    assert (bank["policy"], other["policy"]) == ("bank", "default")
    kid, banked, plain = kids["results"][0], bank["results"][0], other["results"][0]
    assert (kid["decision"], kid["flagged"], kid["flagged_categories"]) == ("block", True, ["self-harm"])
    assert (banked["decision"], banked["flagged"], banked["category_decisions"]["self-harm"]) == (
        "review",
        False,
        "review",
    )
    assert (plain["decision"], plain["flagged"]) == ("allow", False)  # the model's 0.5: today's behaviour
    # Guidance from the tenant's own library; a review also gets guidance (the softer answer), from the service's.
    assert [g["library_version"] for g in kid["guidance"]] == ["kids-1"]
    assert [g["category"] for g in banked["guidance"]] == ["self-harm"]
    assert banked["guidance"][0]["library_version"] != "kids-1"
    assert plain["guidance"] == []


def test_a_tenant_that_ignores_a_category_never_gets_it_flagged(client):
    bank = classify(client, "bank-app", "my landlord kept my deposit")["results"][0]
    assert bank["scores"]["legal-advice"] > 0.99
    assert (bank["flagged"], bank["flagged_categories"], bank["decision"]) == (False, [], "allow")
    assert bank["category_decisions"]["legal-advice"] == "allow" and bank["guidance"] == []
    other = classify(client, "other-app", "my landlord kept my deposit")["results"][0]
    assert (other["flagged_categories"], other["decision"]) == (["legal-advice"], "block")
    moderated = client.post("/v1/moderations", json={"input": "my landlord"}, headers=auth("bank-app")).json()
    assert moderated["results"][0]["flagged"] is False
    assert moderated["results"][0]["categories"]["legal-advice"] is False


def test_without_api_keys_a_declared_client_id_cannot_choose_a_policy(tenant_settings):
    open_service = tenant_settings.model_copy(update={"api_keys": {}})
    with TestClient(create_app(open_service)) as test_client:
        body = test_client.post("/classify", json={"text": BORDERLINE}, headers={"X-Client-Id": "kids-app"}).json()
    assert body["policy"] == "default" and body["results"][0]["decision"] == "allow"


def test_conversations_are_decided_by_the_tenant_too(client):
    messages = [{"role": "user", "content": "I want to die"}, {"role": "user", "content": "hello there"}]
    kids = client.post("/classify", json={"messages": messages}, headers=auth("kids-app")).json()["results"][0]
    assert kids["decided_by_context"] is True and kids["decision"] == "block"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_decisions_are_counted_per_tenant_with_tenants_from_the_file_only(client):
    series = {"category": "self-harm", "decision": "block"}
    before = {t: metric("guardloop_policy_decisions_total", tenant=t, **series) for t in ("kids", "default")}
    review_before = metric("guardloop_policy_decisions_total", tenant="bank", category="overall", decision="review")
    classify(client, "kids-app", BORDERLINE)
    classify(client, "bank-app", BORDERLINE)
    classify(client, "other-app", "I want to die")
    assert metric("guardloop_policy_decisions_total", tenant="kids", **series) == before["kids"] + 1
    assert metric("guardloop_policy_decisions_total", tenant="default", **series) == before["default"] + 1
    assert metric("guardloop_policy_decisions_total", tenant="bank", category="overall", decision="review") == (
        review_before + 1
    )
    text = client.get("/metrics").text
    assert 'guardloop_policy_decisions_total{category="legal-advice",decision="review",tenant="kids"} 0.0' in text
    assert 'tenant="other-app"' not in text and 'tenant="kids-app"' not in text  # client names never become labels
    assert 'guardloop_policy_info{version="2026-11-29.1"} 1.0' in text


# ------------------------------------------------------------------------------------------ reload


def test_a_broken_policy_file_is_refused_and_the_old_one_keeps_deciding(client, tenant_settings, caplog):
    path = tenant_settings.policy_path
    refused_before = metric("guardloop_policy_reloads_total", outcome="refused")
    broken = yaml.safe_load(path.read_text()) | {"version": "2"}
    broken["tenants"]["kids"]["thresholds"] = {"self-harm": 3}
    with caplog.at_level(logging.ERROR, logger="guardloop.service.policy_store"):
        write_yaml(path, broken)
        assert wait_for(lambda: client.app.state.policies.refused is not None)
    assert "tenants.kids.thresholds: threshold of 'self-harm' is 3" in client.app.state.policies.refused.reason
    assert any("still deciding with version 2026-11-29.1" in r.getMessage() for r in caplog.records)
    assert metric("guardloop_policy_reloads_total", outcome="refused") == refused_before + 1
    assert metric("guardloop_policy_refused") == 1
    kids = classify(client, "kids-app", BORDERLINE)
    assert kids["policy_version"] == "2026-11-29.1" and kids["results"][0]["decision"] == "block"
    admin = {"Authorization": f"Bearer {tenant_settings.admin_token_value}"}
    listed = client.get("/admin/policies", headers=admin).json()
    assert listed["version"] == "2026-11-29.1" and "threshold of 'self-harm' is 3" in listed["refused"]["reason"]
    assert client.get("/admin/policies").status_code == 401

    fixed = broken | {"version": "3"}
    fixed["tenants"]["kids"]["thresholds"] = {"self-harm": 0.9}  # no restart: the next answers use it
    write_yaml(path, fixed)
    assert wait_for(lambda: client.app.state.policies.current.version == "3")
    kids = classify(client, "kids-app", BORDERLINE)
    assert kids["policy_version"] == "3" and kids["results"][0]["decision"] == "allow"
    assert metric("guardloop_policy_refused") == 0
    assert client.get("/admin/policies", headers=admin).json()["refused"] is None


def test_a_changed_tenant_library_is_reloaded_and_a_broken_one_refuses_the_policy(tmp_path):
    path = write_policy(tmp_path)
    store = PolicyStore(path, known_clients=KEYS)
    assert store.current.by_name["kids"].guidelines.version == "kids-1"
    library = yaml.safe_load(DEFAULT_LIBRARY_PATH.read_text(encoding="utf-8")) | {"version": "kids-2"}
    write_yaml(tmp_path / "kids.yaml", library)
    assert store.poll() is True and store.current.by_name["kids"].guidelines.version == "kids-2"
    write_yaml(tmp_path / "kids.yaml", {"version": "kids-3", "categories": {}})
    assert store.poll() is False
    assert "kids.guidelines:" in store.refused.reason and "no entry for" in store.refused.reason
    assert store.current.by_name["kids"].guidelines.version == "kids-2"


def test_unknown_clients_are_a_warning_and_a_broken_file_at_start_up_stops_the_service(tmp_path, tenant_settings):
    store = PolicyStore(write_policy(tmp_path), known_clients={"kids-app"})
    assert store.current.warnings == ("clients without an API key never match their tenant: bank-app",)
    write_yaml(tenant_settings.policy_path, {"version": "x", "tenants": {"kids": {"clients": []}}})
    with pytest.raises(PolicyError, match=r"tenants\.kids\.clients"), TestClient(create_app(tenant_settings)):
        pass


# ------------------------------------------------------------------------------------------ pool and calibration


def test_pool_entries_carry_the_tenant_and_review_band_texts_reach_reviewers_first(
    tmp_path, tenant_settings, postgres_url
):
    policy = yaml.safe_load(tenant_settings.policy_path.read_text())
    policy["tenants"]["bank"]["pool"] = True
    policy["tenants"]["quiet"] = {"clients": ["other-app"], "pool": False}
    write_yaml(tenant_settings.policy_path, policy)
    live = tenant_settings.model_copy(update={"database_url": SecretStr(postgres_url), "pool_sample_rate": 1.0})
    with TestClient(create_app(live)) as test_client:
        classify(test_client, "bank-app", BORDERLINE)  # in bank's review band
        classify(test_client, "kids-app", LANDLORD)  # confident: pooled by the sample rate, with its tenant
        classify(test_client, "other-app", "a text the quiet tenant keeps out of the pool")
        database = Database(postgres_url)
        pool = PoolRepository(database)
        writer = test_client.app.state.pool.writer
        assert wait_for(lambda: pool.count() == 2 and writer.counters().queued == 0)
        # A text is handed to the writer during its request, so all three are decided: the quiet tenant's never was.
        assert writer.counters().offered == 2
        items = {item.text: item for item in pool.iter_items()}
    assert set(items) == {BORDERLINE, LANDLORD}
    band, sampled = items[BORDERLINE], items[LANDLORD]
    assert (band.tenant, band.sampled_by, sampled.tenant, sampled.sampled_by) == ("bank", REVIEW_BAND, "kids", "random")
    assert band.requested_at is not None and sampled.requested_at is None
    assert band.request_reason == {
        "strategy": REVIEW_BAND,
        "categories": ["self-harm"],
        "policy_version": "2026-11-29.1",
    }
    assert band.priority > 1.0  # above any cycle's request (priority = uncertainty <= 1)
    pool.mark_requested([_request(sampled.id)], at=sampled.last_seen)  # a cycle's pick at its highest priority
    assert [item.text for item in ReviewRepository(database).queue("ann", limit=5)] == [BORDERLINE, LANDLORD]


def _request(item_id: int):
    from guardloop.storage import LabelRequest

    return LabelRequest(item_id, {"strategy": "topn", "uncertainty": 1.0}, priority=1.0)


def test_calibrate_tenant_turns_its_reviewed_labels_into_its_thresholds(tmp_path, tenant_settings):
    # Reviewed band texts of the bank: "sad" texts scoring 0.33-0.83 self-harm, labeled by a reviewer.
    database_url = f"sqlite:///{tmp_path / 'pool.db'}"
    live = tenant_settings.model_copy(update={"database_url": SecretStr(database_url)})
    policy = yaml.safe_load(live.policy_path.read_text())
    # Every "sad" text in the bank's band, so all four are requested for review.
    policy["tenants"]["bank"] |= {"pool": True, "thresholds": {"self-harm": 0.9}, "review": {"self-harm": 0.1}}
    write_yaml(live.policy_path, policy)
    texts = {
        "sad": "self-harm",
        "so sad": "self-harm",
        "i feel sad": "not-harmful",
        "i feel so sad today": "not-harmful",
    }
    with TestClient(create_app(live)) as test_client:
        for text in texts:
            classify(test_client, "bank-app", text)
        reviews = ReviewRepository(Database(database_url))
        assert wait_for(lambda: len(reviews.queue("ann", limit=10)) == len(texts))
    for item in reviews.queue("ann", limit=10):
        reviews.add_label(item.id, "ann", texts[item.text])
    env = {
        "GUARDLOOP_REGISTRY_DIR": str(live.registry_dir),
        "GUARDLOOP_DATA_DIR": str(live.data_dir),
        "GUARDLOOP_DATABASE_URL": database_url,
        "GUARDLOOP_POLICY_PATH": str(live.policy_path),
    }
    runner = CliRunner()
    args = ["calibrate", "--tenant", "bank", "--target-precision", "self-harm=1.0"]
    printed = runner.invoke(app_cli(), args, env=env)
    assert printed.exit_code == 0, printed.output
    snippet = yaml.safe_load(printed.stdout[printed.stdout.index("# guardloop calibrate --tenant bank") :])
    threshold = snippet["tenants"]["bank"]["thresholds"]["self-harm"]
    assert 0.49 < threshold <= 0.64  # above "i feel sad" (0.49, not self-harm), at or below "so sad" (0.64)
    assert load_policy_file(live.policy_path).version == "2026-11-29.1"  # printing writes nothing

    before = load_policy_file(live.policy_path)
    written = runner.invoke(app_cli(), [*args, "--write-policy"], env=env)
    assert written.exit_code == 0, written.output
    stored = load_policy_file(live.policy_path)
    assert stored.version.endswith("-calibrated-bank")
    assert stored.tenants["bank"].thresholds == {"self-harm": threshold}
    assert stored.tenants["bank"].review == {"self-harm": 0.1}
    assert stored.tenants["kids"] == before.tenants["kids"]

    unknown = runner.invoke(app_cli(), ["calibrate", "--tenant", "nobody", "--target-precision", "0.9"], env=env)
    assert unknown.exit_code == 2 and "--tenant nobody: not in" in unknown.output
    kids = runner.invoke(app_cli(), ["calibrate", "--tenant", "kids", "--target-precision", "0.9"], env=env)
    assert kids.exit_code == 2 and "no reviewed labels of its traffic yet" in kids.output


def app_cli():
    from guardloop.cli import app

    return app


def test_serve_refuses_a_broken_policy_file_in_one_line(tmp_path):
    path = write_yaml(
        tmp_path / "policy.yaml", {"version": "1", "tenants": {"kids": {"clients": ["a"], "ignore": "x"}}}
    )
    env = {
        "GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"),  # empty: getting past the check would train (minutes)
        "GUARDLOOP_DATA_DIR": str(tmp_path / "data"),
        "GUARDLOOP_POLICY_PATH": str(path),
    }
    result = CliRunner().invoke(app_cli(), ["serve"], env=env)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: GUARDLOOP_POLICY_PATH: {path}: tenants.kids.ignore")
    assert not (tmp_path / "registry").exists()


def test_bench_policy_prints_the_per_text_cost_beside_the_forward_pass(tmp_path, tenant_settings):
    env = {"GUARDLOOP_REGISTRY_DIR": str(tenant_settings.registry_dir), "GUARDLOOP_DATA_DIR": str(tmp_path / "d")}
    policy = str(tenant_settings.policy_path)
    result = CliRunner().invoke(app_cli(), ["bench", "policy", "--policy", policy, "--repeats", "2"], env=env)
    assert result.exit_code == 0, result.output
    assert "forward pass of one text" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("no policy file", "policy.yaml"))]
    assert [row.split("  ")[0] for row in rows] == [
        "no policy file (default, today's rule)",
        "policy.yaml: default",
        "policy.yaml: tenant kids",
        "policy.yaml: tenant bank",
    ]
