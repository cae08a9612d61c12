"""bcrypt's checks counted, for the tests of password floods (the edge's and /metrics')."""

import threading


class CountedChecks:
    """bcrypt.checkpw in place (monkeypatched): how many checks ran in all, and the most at once."""

    def __init__(self, monkeypatch):
        import bcrypt

        self.running, self.most, self.total = 0, 0, 0
        self._lock, self._checkpw = threading.Lock(), bcrypt.checkpw
        monkeypatch.setattr(bcrypt, "checkpw", self._counted)

    def _counted(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.running += 1
            self.total += 1
            self.most = max(self.most, self.running)
        try:
            return self._checkpw(password, hashed)
        finally:
            with self._lock:
                self.running -= 1
