"""Steady client load for the operations tests: threads that submit jobs and
poll them through one or more Envoys (at a steady rate, or as fast as they
go), recording every answer with the moment
it was asked and answered, so that a test can say afterwards which requests
failed, when, and whether every accepted job ended.

    load = Load([client_a, client_b], body).start()
    ...                              # a fault, a push, a restart
    load.stop_submitting()
    load.wait_all_ended(timeout=60)  # polls until every accepted job ended
    load.stop()

Every answer is an `Answer`; every job that got its 202 is a `Job`. A request
that got no answer at all (connection refused or reset, a timeout) is
recorded with status 0 and the error's text.
"""

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

SPEECH = "/v1/async/audio/speech"


@dataclass
class Answer:
    kind: str  # "submit" or "poll"
    target: str  # host:port asked
    job: str | None
    sent: float  # time.monotonic()
    answered: float
    status: int  # 0: no answer at all
    message: str = ""
    retry_after: str | None = None


@dataclass
class Job:
    id: str
    submitted: float
    created_at: str
    config: int  # which configuration (a counter the test keeps) was in force at the submit
    polls: int = 0
    final: dict | None = None  # the poll answer once the job ended
    ended_seen: float | None = None


@dataclass
class Load:
    """`clients`: objects with `host` and `port` (conftest.Client). `body`: the
    submit's JSON. `submit_pause`/`poll_pause`: seconds each thread waits
    between its requests (0: as fast as it goes). `rate`: submits per second
    (the n-th is sent n/rate seconds after the start). `max_jobs`: submit that
    many times, then stop."""

    clients: list
    body: dict
    key: str = "sk-bf-team-a-secret"
    submitters: int = 2
    pollers: int = 2
    submit_pause: float = 0.0
    poll_pause: float = 0.0
    rate: float | None = None  # submits per second, all submitters together
    max_jobs: int | None = None
    timeout: float = 10.0
    answers: list = field(default_factory=list)
    jobs: dict = field(default_factory=dict)
    config: int = 0  # set by the test when it changes the configuration

    def __post_init__(self):
        self._lock = threading.Lock()
        self._submitting = threading.Event()
        self._running = threading.Event()
        self._threads = []
        self._unended = []  # ids in submit order, polled in turn
        self._next_poll = 0
        self._turn = 0
        self._submits = 0
        self._started = None

    # Requests.

    def _target(self):
        with self._lock:
            self._turn += 1
            return self.clients[self._turn % len(self.clients)]

    def request(self, kind, method, path, body=None, client=None, job=None):
        client = client or self._target()
        headers = {"authorization": f"Bearer {self.key}"}
        if body is not None:
            body = json.dumps(body)
            headers["content-type"] = "application/json"
        sent = time.monotonic()
        conn = http.client.HTTPConnection(client.host, client.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            status, retry_after = r.status, r.getheader("retry-after")
        except (OSError, http.client.HTTPException) as e:
            status, data, retry_after = 0, repr(e).encode(), None
        finally:
            conn.close()
        answered = time.monotonic()
        parsed = None
        message = ""
        try:
            parsed = json.loads(data)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                message = parsed["error"].get("message", "")
        except ValueError:
            message = data[:200].decode(errors="replace")
        answer = Answer(kind, f"{client.host}:{client.port}", job, sent, answered, status, message, retry_after)
        with self._lock:
            self.answers.append(answer)
        return answer, parsed

    def submit_one(self):
        answer, parsed = self.request("submit", "POST", SPEECH, self.body)
        if answer.status == 202 and isinstance(parsed, dict) and "id" in parsed:
            job = Job(parsed["id"], answer.answered, parsed.get("created_at", ""), self.config)
            with self._lock:
                self.jobs[job.id] = job
                self._unended.append(job.id)
            return job
        return None

    def poll_one(self, job_id, client=None):
        answer, parsed = self.request("poll", "GET", f"{SPEECH}/{job_id}", client=client, job=job_id)
        with self._lock:
            job = self.jobs[job_id]
            job.polls += 1
            if answer.status == 200 and isinstance(parsed, dict) and parsed.get("status") in ("completed", "failed"):
                if job.final is None:
                    job.ended_seen = answer.answered
                job.final = parsed
        return answer, parsed

    # Threads.

    def _submitter(self):
        while self._submitting.is_set():
            with self._lock:
                if self.max_jobs is not None and self._submits >= self.max_jobs:
                    break
                n = self._submits
                self._submits += 1
            if self.rate:
                wait = self._started + n / self.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            self.submit_one()
            if self.submit_pause:
                time.sleep(self.submit_pause)

    def _next_unended(self):
        with self._lock:
            self._unended = [j for j in self._unended if self.jobs[j].final is None]
            if not self._unended:
                return None
            self._next_poll = (self._next_poll + 1) % len(self._unended)
            return self._unended[self._next_poll]

    def _poller(self):
        while self._running.is_set():
            job_id = self._next_unended()
            if job_id is None:
                time.sleep(0.05)
                continue
            self.poll_one(job_id)
            if self.poll_pause:
                time.sleep(self.poll_pause)

    def start(self, submit=True):
        """Starts the threads (again, after `stop()`, to go on polling the same
        jobs, perhaps through other clients: `clients` may be changed between)."""
        # The rate goes on from where it was: no burst to catch up.
        self._started = time.monotonic() - (self._submits / self.rate if self.rate else 0)
        if submit:
            self._submitting.set()
        self._running.set()
        submitters = self.submitters if submit else 0
        self._threads = [threading.Thread(target=self._submitter, daemon=True, name=f"submitter-{i}")
                         for i in range(submitters)]
        self._threads += [threading.Thread(target=self._poller, daemon=True, name=f"poller-{i}")
                          for i in range(self.pollers)]
        for t in self._threads:
            t.start()
        return self

    def _submitter_threads(self):
        return [t for t in self._threads if t.name.startswith("submitter")]

    def submitting(self):
        """Whether a submitter still runs (False once `max_jobs` jobs were accepted)."""
        return any(t.is_alive() for t in self._submitter_threads())

    def stop_submitting(self):
        self._submitting.clear()
        for t in self._submitter_threads():
            t.join(timeout=self.timeout + 5)

    def unended(self):
        with self._lock:
            return [j for j in self.jobs.values() if j.final is None]

    def wait_all_ended(self, timeout):
        """Waits (polling goes on in the threads) until every accepted job ended,
        or `timeout` passed; returns the jobs that have not ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.unended()
            if not left:
                return []
            time.sleep(0.2)
        return self.unended()

    def stop(self):
        self._submitting.clear()
        self._running.clear()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)

    # What happened.

    def between(self, start, end):
        """Answers to requests sent at or after `start` and before `end`."""
        with self._lock:
            return [a for a in self.answers if start <= a.sent < end]

    def failures(self, answers=None, allowed=(200, 202)):
        return [a for a in (self.answers if answers is None else answers) if a.status not in allowed]


def describe(answers, limit=8):
    """A short account of some answers, for assertion messages."""
    counts = {}
    for a in answers:
        key = (a.kind, a.status, a.message[:90])
        counts[key] = counts.get(key, 0) + 1
    lines = [f"{n} x {kind} {status} {message!r}" for (kind, status, message), n in
             sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]
    return "; ".join(lines) or "none"


def failed_jobs(jobs, limit=8):
    """A short account of jobs that failed, by their error message."""
    counts = {}
    for j in jobs:
        final = j.final or {}
        error = final.get("error") or {}
        message = (error.get("error") or {}).get("message", "") if isinstance(error, dict) else str(error)
        key = (final.get("status_code"), message[:120])
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{n} x {status} {message!r}" for (status, message), n in
                     sorted(counts.items(), key=lambda kv: -kv[1])[:limit]) or "none"
