"""Property-based requests generated from the server's OpenAPI schema (schemathesis, in-process over ASGI)
against a tiny index behind a token: never a 5xx, every answer documented (status, content type, body
schema, headers), and no byte of a file outside the indexed root ever served."""

import hashlib

import pytest

from tests.conftest import COLOURS, SHAPES, make_image, tiny_hf_clip

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CANARY = b"CLIPLAB-CANARY-outside-the-root"


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory, towers):
    from cliplab.serve.app import ServerSettings, create_app
    from cliplab.serve.index import IndexBuilder

    tmp = tmp_path_factory.mktemp("fuzz")
    _, folder = tiny_hf_clip(tmp, towers[1].tokenizer)
    photos = tmp / "photos"
    photos.mkdir()
    for i, (c, s) in enumerate([(c, s) for c in COLOURS for s in SHAPES][:6]):
        make_image(photos / f"{c}_{s}.{'png' if i % 2 else 'jpg'}", c, s, seed=i)
    (tmp / "secret.jpg").write_bytes(CANARY)
    (photos / "link.jpg").symlink_to(tmp / "secret.jpg")  # refused by the indexer, never served
    IndexBuilder(tmp / "index", f"clip:{folder}", log=lambda m: None, progress=False).build([photos])
    app = create_app(ServerSettings(tmp / "index", token=TOKEN, thumb_dir=tmp / "thumbs", max_k=20,
                                    max_upload_bytes=200_000, max_pixels=2_000_000))
    inside = {hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.iterdir() if not p.is_symlink()}
    return app, inside


@pytest.fixture(scope="module")
def api_schema(fuzz_env):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_env[0], headers={"Host": "127.0.0.1", **AUTH})


OPERATIONS = [("GET", "/healthz"), ("GET", "/api/info"), ("GET", "/api/search"), ("POST", "/api/search"),
              ("GET", "/image/{item_id}"), ("GET", "/thumb/{item_id}"), ("GET", "/indices-list"),
              ("POST", "/knn-service"), ("POST", "/metadata"), ("GET", "/api/duplicates")]


@pytest.mark.slow
def test_every_operation_is_fuzzed(api_schema):
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize("method,path", OPERATIONS)
@pytest.mark.slow
def test_generated_requests_never_fail_the_server(api_schema, fuzz_env, method, path):
    """Valid and invalid requests (schemathesis' positive and negative modes), 40 per operation."""
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate(
            base_url="http://127.0.0.1", headers=AUTH,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance, response_headers_conformance])
        assert response.status_code < 500
        assert CANARY not in response.content and b"root:x:0:0" not in response.content
        assert response.headers.get("x-content-type-options") == ["nosniff"]
        if response.status_code == 200 and path == "/image/{item_id}":
            assert hashlib.sha256(response.content).hexdigest() in fuzz_env[1]  # indexed files only, byte for byte

    check()
