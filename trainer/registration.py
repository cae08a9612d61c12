"""Reporting a job process's /metrics endpoint to the job server, for Prometheus' HTTP service discovery
across hosts (the job server lists every running job's endpoints at /api/training/sd).

The job server gives each run a URL and a secret (TRAINMETRICS_REGISTER_TOKEN, in the environment, never on
the command line). A failure is logged, never raised: the job trains on, only undiscovered.
"""

import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request

from trainmetrics.contract import REGISTER_TOKEN_VARIABLE

log = logging.getLogger("trainmetrics.trainer")

TIMEOUT_SECONDS = 5.0


class Registration:
    """This process's entry in the job server's service discovery."""

    def __init__(self, url: str, rank: int):
        self.url, self.rank = url, rank
        self.token = os.environ.get(REGISTER_TOKEN_VARIABLE, "")
        self.registered = False
        self.watched = False        # the job server says a scraper reads its service discovery

    def _send(self, method: str, body: dict | None = None) -> dict | None:
        query = "" if body is not None else "?" + urllib.parse.urlencode({"rank": self.rank})
        request = urllib.request.Request(self.url + query, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                answer = json.loads(response.read() or b"{}") if 200 <= response.status < 300 else None
                return answer if isinstance(answer, dict) else {}
        # http.client's own errors too: a port that answers no HTTP (BadStatusLine) or an answer cut short
        # (IncompleteRead) raised out of JobMetrics(), and the job never started.
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
            log.warning("job endpoint %s at %s failed: %s", "registration" if body else "removal", self.url, error)
            return None

    def register(self, address: str, scheme: str) -> bool:
        """Report host:port and scheme; True when the job server took them."""
        answer = self._send("POST", {"rank": self.rank, "address": address, "scheme": scheme})
        self.registered = answer is not None
        self.watched = bool(answer and answer.get("watched"))
        return self.registered

    def withdraw(self) -> None:
        """Remove the endpoint (after the final linger)."""
        if self.registered:
            self._send("DELETE")
            self.registered = False
