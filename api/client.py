"""A small HTTP client of the saeforge service (used by the CLI; usable from notebooks and scripts).

    client = Client("http://127.0.0.1:8000", token="...")   # or SAEFORGE_API_URL / SAEFORGE_API_TOKEN
    job = client.submit({"name": "tiny", ...})
    client.wait(job["id"])
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: Any):
        self.status, self.detail = status, detail
        if isinstance(detail, dict) and "message" in detail:
            text = detail["message"]
        elif isinstance(detail, dict) and "detail" in detail:
            text = detail["detail"] if isinstance(detail["detail"], str) else str(detail["detail"])
        else:
            text = str(detail)
        super().__init__(f"HTTP {status}: {text}")


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0):
        self.url = (url or os.environ.get("SAEFORGE_API_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("SAEFORGE_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ApiError(0, f"cannot reach the saeforge API at {self.url}: {error}") from None
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/jobs", json=spec).json()

    def jobs(self, states: list[str] | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if states:
            params["state"] = states
        return self._request("GET", "/v1/jobs", params=params).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def logs(self, job_id: str, tail: int = 200) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail}).json()

    def compare(self, experiment: str, job_id: str | None = None) -> dict[str, Any]:
        params = {"experiment": experiment, **({"job_id": job_id} if job_id else {})}
        return self._request("GET", "/v1/compare", params=params).json()

    def compare_plot(self, experiment: str, job_id: str | None = None) -> bytes:
        params = {"experiment": experiment, **({"job_id": job_id} if job_id else {})}
        return self._request("GET", "/v1/compare/plot.png", params=params).content

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 2.0, on_update=None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
            time.sleep(poll)
