"""The optional LLM explainer and detection scorer, against a stand-in OpenAI-compatible server on this machine."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from saelab.evals.endpoint import Endpoint, EndpointError, detect, explain


class Fake(BaseHTTPRequestHandler):
    """Answers `/v1/chat/completions`: an explanation, or for detection 1 for each listed text that says 'file'."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        if "answer 1" in prompt:
            texts = [line.split(". ", 1)[1] for line in prompt.splitlines() if line[:1].isdigit()]
            answer = " ".join("1" if "file" in t else "0" for t in texts)
        else:
            answer = "the word file"
        out = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = HTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield Endpoint(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "fake")
    httpd.shutdown()


def test_explain_and_detect(server):
    assert explain(server, ["open a <<file>>", "the <<file>> mode"]) == "the word file"
    score = detect(server, "the word file", ["a file", "file mode"], ["a socket", "the loop", "a thread"])
    assert score == 1.0


def test_an_endpoint_that_does_not_answer_names_the_fix():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EndpointError, match="does not answer.*start the server"):
        explain(Endpoint(f"http://127.0.0.1:{port}/v1", "any", timeout=5), ["x"])
