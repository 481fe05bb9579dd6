"""The official OpenAI Python client against `examples/serve` over real HTTP on loopback.

    python tools/openai_client_check.py [path/to/serve] [--model DIR]

Starts the server on 127.0.0.1 (port 0, the address read from its first log line), then with
the `openai` package: lists the models, asks for completions and chat completions, plain and
streamed (with usage), with stop strings, seeds and log-probabilities, and checks that a bad
request raises the client's BadRequestError. Prints one line per check and a closing
"N passed, M failed"; exits non-zero on any failure. The server is stopped at the end.
"""

import re
import subprocess
import sys
import time

import openai


def start(serve, model):
    args = [serve, "--port", "0", "--max-sequences", "4"]
    if model:
        args += ["--model", model]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"on (http://[0-9.:]+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("the server did not start")


def main():
    serve = "target/release/examples/serve"
    model = None
    rest = sys.argv[1:]
    if rest and not rest[0].startswith("--"):
        serve = rest.pop(0)
    if len(rest) == 2 and rest[0] == "--model":
        model = rest[1]
    proc, base = start(serve, model)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    results = []

    def check(name, fn):
        try:
            fn()
            results.append(True)
            print(f"ok     {name}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            results.append(False)
            print(f"FAILED {name}: {type(e).__name__}: {e}")

    def models():
        ids = [m.id for m in client.models.list().data]
        assert len(ids) == 1, ids

    name = client.models.list().data[0].id

    def completion():
        r = client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=30, seed=4,
                                      temperature=0.8, stop=["\n\n"], logprobs=2)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length"), c.finish_reason
        assert len(c.logprobs.tokens) == r.usage.completion_tokens
        assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
        again = client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=30, seed=4,
                                          temperature=0.8, stop=["\n\n"])
        assert again.choices[0].text == c.text

    def completion_stream():
        whole = client.completions.create(model=name, prompt="JULIET.\n", max_tokens=25, seed=9)
        text, usage = "", None
        for chunk in client.completions.create(model=name, prompt="JULIET.\n", max_tokens=25,
                                               seed=9, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        assert text == whole.choices[0].text, (text, whole.choices[0].text)
        assert usage.completion_tokens == whole.usage.completion_tokens

    def n_samples():
        r = client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=8, seed=50, n=3)
        assert [c.index for c in r.choices] == [0, 1, 2]
        for j, c in enumerate(r.choices):
            alone = client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=8,
                                              seed=50 + j)
            assert c.text == alone.choices[0].text, (j, c.text, alone.choices[0].text)

    def echo_several():
        r = client.completions.create(model=name, prompt=["ROMEO.\n", "JULIET.\n"], max_tokens=1,
                                      temperature=0, logprobs=1, echo=True)
        assert [c.index for c in r.choices] == [0, 1]
        for c in r.choices:
            lp = c.logprobs.token_logprobs
            assert lp[0] is None and all(x <= 0 for x in lp[1:]), lp
        scored = client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=0,
                                           logprobs=0, echo=True)
        assert scored.usage.completion_tokens == 0
        assert scored.choices[0].logprobs.token_logprobs[1:] == r.choices[0].logprobs.token_logprobs[1:-1]

    messages = [{"role": "system", "content": "A street in Verona."},
                {"role": "user", "content": "ROMEO."}]

    def chat():
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=25, seed=2,
                                           logprobs=True, top_logprobs=2)
        m = r.choices[0].message
        assert m.role == "assistant" and m.content, m
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
        assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)

    def chat_stream():
        whole = client.chat.completions.create(model=name, messages=messages, max_tokens=25,
                                               seed=3)
        content, role, usage = "", None, None
        for chunk in client.chat.completions.create(model=name, messages=messages,
                                                    max_tokens=25, seed=3, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices:
                d = chunk.choices[0].delta
                role = role or d.role
                content += d.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert role == "assistant", role
        assert content == whole.choices[0].message.content, (content, whole)
        assert usage.total_tokens == whole.usage.total_tokens

    def bad_requests():
        for call in (
            lambda: client.completions.create(model=name, prompt="x", max_tokens=0),
            lambda: client.chat.completions.create(model=name, messages=[], max_tokens=5),
            lambda: client.chat.completions.create(model=name, messages=messages, temperature=-1),
        ):
            try:
                call()
            except openai.BadRequestError as e:
                assert e.status_code == 400
            else:
                raise AssertionError("a bad request was accepted")

    try:
        for n, f in [("models", models), ("completion", completion),
                     ("completion stream", completion_stream), ("echo, several prompts", echo_several),
                     ("n samples", n_samples),
                     ("chat", chat),
                     ("chat stream", chat_stream), ("bad requests", bad_requests)]:
            check(n, f)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
