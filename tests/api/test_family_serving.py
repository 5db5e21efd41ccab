"""``llada-serve --model DIR`` on a local directory of each format: every
golden checkpoint written with its family's tokenizer files
(tests/family_checkpoints.py), served with the configs the command line
builds, answers chat and completions through the openai client with the
tokens LLM.generate gives for the same settings (the family's own decoding
by default) and the golden reference's tokens, and /v1/models says what is
served."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import openai
import pytest

from server.__main__ import build_parser
from server.api.launch import build_configs
from server.engine.llm import LLM
from tests.api.conftest import MODEL_NAME, is_healthy, start_server, wait_for
from tests.family_checkpoints import FAMILIES, stop_case, write_family_checkpoint

pytestmark = pytest.mark.golden
NAMES = list(FAMILIES)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the earth"}]


@pytest.fixture(scope="module", params=NAMES)
def served(request, tmp_path_factory):
    name = request.param
    ck = write_family_checkpoint(name, tmp_path_factory.mktemp("served") / name, template_file=name == "dream")
    _, _, server_config = build_configs(build_parser().parse_args(["serve", "--model", str(ck.path)]))
    # served as the tests name it (the command line would name it by its path)
    srv = start_server(ck.path, replace(server_config, served_model_name=MODEL_NAME))
    offline = LLM(str(ck.path), dtype="float32", device="cpu")
    yield name, ck, srv, offline, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    srv.stop()


ARCHITECTURE = {"llada": "LLaDAModelLM", "llada-moe": "LLaDAMoEModelLM", "llada2": "LLaDA2MoeModelLM",
                "dream": "DreamModel"}
FAMILY_DECODING = {  # what a request that gives no settings gets, beyond the shared defaults
    "llada": dict(schedule="llada", remasking="low_confidence", block_length=32),
    "llada-moe": dict(schedule="llada", remasking="low_confidence", block_length=32),
    "llada2": dict(schedule="llada2", remasking="threshold_quota", threshold=0.95, steps=32, block_length=32,
                   editing_threshold=None),
    "dream": dict(schedule="dream", remasking="origin", eps=1e-3, alg_temp=0.0),
}


def test_models_show_the_architecture_and_decoding_served(served):
    name, ck, srv, offline, client = served
    listed = client.models.list().data
    card = client.models.retrieve(MODEL_NAME).to_dict()
    assert [m.id for m in listed] == [MODEL_NAME] and listed[0].to_dict().keys() == card.keys()
    config = json.loads((ck.path / "config.json").read_text())
    assert card["architecture"] == ARCHITECTURE[name] and card["model_type"] == config["model_type"]
    assert card["mask_token_id"] == ck.mask_id and card["stop_token_ids"] == sorted({ck.eos_id, ck.eot_id})
    assert card["max_model_len"] == config.get("max_sequence_length", config.get("max_position_embeddings"))
    assert card["vocab_size"] == config["vocab_size"]
    assert card["decoding_modes"] == {"llada2": ["exact", "prefix_cache"], "dream": ["exact"]}.get(
        name, ["exact", "prefix_cache", "dual_cache"])
    decoding = card["decoding"]
    assert decoding.items() >= FAMILY_DECODING[name].items()
    want = asdict(offline.default_params(gen_length=decoding["max_tokens"]))
    assert decoding == {"max_tokens": want.pop("gen_length")} | {
        k: v for k, v in want.items() if k not in ("seed", "ignore_eos", "logprobs", "stop")}


def test_chat_uses_the_template_and_the_familys_decoding(served):
    name, ck, srv, offline, client = served
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, seed=3)
    want = offline.chat(MESSAGES, offline.default_params(gen_length=24, seed=3))[0]
    assert want.prompt_token_ids == offline.tokenizer.encode_chat(MESSAGES)
    assert out.choices[0].message.content == want.text
    assert out.usage.completion_tokens == len(want.token_ids)
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.choices[0].finish_reason == want.finish_reason


def test_completion_gives_the_references_tokens_cut_at_the_end_of_turn(served):
    name, ck, srv, offline, client = served
    prompt, fields, full = stop_case(name)
    extra = {k: v for k, v in fields.items() if k != "gen_length"}
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=fields["gen_length"], extra_body=extra)
    end = full.index(ck.eot_id)
    assert out.choices[0].text == offline.tokenizer.decode(full[:end]) != ""
    assert out.usage.completion_tokens == end and out.choices[0].finish_reason == "stop"
    alone = offline.generate([prompt], offline.default_params(**fields))[0]
    assert alone.token_ids == full[:end]
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=fields["gen_length"],
                                      extra_body=extra | {"ignore_eos": True})
    assert whole.choices[0].text == offline.tokenizer.decode(full)
    assert whole.usage.completion_tokens == len(full)


def test_generate_command_decodes_with_the_familys_defaults(tmp_path, capsys):
    """``llada-serve generate`` on an LLaDA2 directory: the llada2 schedule
    and threshold come from the checkpoint; the flags give only lengths."""
    from server.__main__ import main

    ck = write_family_checkpoint("llada2", tmp_path / "llada2")
    prompt, fields, full = stop_case("llada2")
    assert main(["generate", "--model", str(ck.path), "--dtype", "float64", "--device", "cpu",
                 "--prompt-ids", ",".join(map(str, prompt)), "--gen-length", str(fields["gen_length"]),
                 "--block-length", str(fields["block_length"]), "--steps", str(fields["steps"])]) == 0
    offline = LLM(str(ck.path), dtype="float64", device="cpu")
    assert capsys.readouterr().out.strip() == offline.tokenizer.decode(full[:full.index(ck.eot_id)])


def test_llada_serve_command_serves_a_local_directory(tmp_path):
    """The real command, ``python -m server --model DIR``, on a Dream
    directory (its template in chat_template.jinja): the card and a chat
    answer equal to LLM.chat's."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    ck = write_family_checkpoint("dream", tmp_path / "dream", template_file=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(ck.path), "--port", str(port),
                             "--dtype", "float32", "--device", "cpu", "--log-level", "warning"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    try:
        assert wait_for(lambda: is_healthy(url), 90), "server did not start"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        card = client.models.retrieve(str(ck.path)).to_dict()
        assert (card["architecture"], card["decoding"]["schedule"]) == ("DreamModel", "dream")
        out = client.chat.completions.create(model=str(ck.path), messages=MESSAGES, max_tokens=16, seed=2)
        offline = LLM(str(ck.path), dtype="float32", device="cpu")
        want = offline.chat(MESSAGES, offline.default_params(gen_length=16, seed=2))[0]
        assert out.choices[0].message.content == want.text
        assert out.usage.completion_tokens == len(want.token_ids)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_llada21_edits_by_default_and_a_request_can_turn_editing_off(tmp_path):
    """An LLaDA2.1 checkpoint (model_type llada21_moe, its generation config
    asking editing_threshold 0.2): its card's decoding edits tokens; a
    request that says nothing edits as LLM.generate does by default, one with
    an explicit null does not."""
    ck = write_family_checkpoint("llada2", tmp_path / "llada21")
    for name, extra in (("config.json", {"model_type": "llada21_moe"}),
                        ("generation_config.json", {"editing_threshold": 0.2})):
        (ck.path / name).write_text(json.dumps(json.loads((ck.path / name).read_text()) | extra))
    srv = start_server(ck.path)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        decoding = client.models.retrieve(MODEL_NAME).to_dict()["decoding"]
        assert decoding.items() >= {"schedule": "llada2", "editing_threshold": 0.2, "max_post_steps": 16,
                                    "num_to_transfer": 1}.items()
        offline = LLM(str(ck.path), dtype="float32", device="cpu")
        prompt = [456, 194, 50, 438, 161, 225, 22, 126, 79, 452, 277, 259]
        texts = {}
        for extra, editing in (({}, 0.2), ({"editing_threshold": None}, None)):
            out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20,
                                            extra_body={"block_length": 8, "ignore_eos": True} | extra)
            want = offline.generate([prompt], offline.default_params(gen_length=20, block_length=8, ignore_eos=True,
                                                                     editing_threshold=editing))[0]
            assert out.choices[0].text == want.text
            texts[editing] = want.text
        assert texts[0.2] != texts[None]  # edits happened by default, and null turned them off
    finally:
        srv.stop()
