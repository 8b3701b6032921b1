"""Special files as landmark or image paths: refused at once, by name, without hanging or growing memory.

Each file is made by the test: a FIFO nobody writes to, ``/dev/zero``, a sparse file past the size bound, symbolic
links that loop or lead nowhere.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import numpy as np
import pytest

from scripts.errors import RegistrationInputError
from scripts.io.anhir import read_landmarks, write_landmarks
from scripts.io.slide_io import MAX_TEXT_FILE_BYTES, read_slide, read_text_file

WAIT_S = 10  # far more than any refusal takes; a hang (a FIFO opened for reading) never ends by itself


def _refusal(read, path: Path) -> RegistrationInputError:
    """The RegistrationInputError ``read(path)`` raises, read in a thread so that a hang fails the test."""
    outcome: list[BaseException | object] = []

    def target() -> None:
        try:
            outcome.append(read(path))
        except BaseException as error:  # noqa: BLE001: whatever it is, the test reports it
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WAIT_S)
    if thread.is_alive():
        if path.is_fifo():  # let the blocked open return, so the thread ends
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading {path} still runs after {WAIT_S} s")
    assert isinstance(outcome[0], RegistrationInputError), outcome[0]
    assert outcome[0].path == str(path)
    return outcome[0]


@pytest.mark.parametrize("read", [read_landmarks, read_slide], ids=["landmarks", "slide"])
def test_fifo_is_refused_without_opening_it(tmp_path, read):
    path = tmp_path / ("fifo.csv" if read is read_landmarks else "fifo.png")
    os.mkfifo(path)
    assert _refusal(read, path).problem == "is a named pipe (FIFO), not a regular file"


def test_dev_zero_is_refused_without_reading_it():
    # an address-space bound for the duration, so that reading /dev/zero into memory fails fast instead of
    # growing to the machine's limit
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, hard))
    try:
        error = _refusal(read_landmarks, Path("/dev/zero"))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert error.problem == "is a character device, not a regular file"


def test_landmark_file_past_the_bound_is_refused_unread(tmp_path):
    path = tmp_path / "huge.csv"
    with path.open("wb") as stream:  # sparse: no disk space, no time
        stream.write(b",X,Y\n0,1,2\n")
        stream.truncate(MAX_TEXT_FILE_BYTES + 1)
    assert _refusal(read_landmarks, path).problem == "is larger than the 64 MiB a landmark file may be"


def test_the_bound_is_a_parameter_for_other_text_files(tmp_path):
    path = tmp_path / "shapes.geojson"
    path.write_text('{"type": "FeatureCollection", "features": []}\n')
    assert read_text_file(path, "annotation file").read() == path.read_text()
    with pytest.raises(RegistrationInputError, match="larger than the 3.8147e-05 MiB an? annotation file may be"):
        read_text_file(path, "annotation file", limit=40)


def test_landmark_file_at_the_bound_still_reads(tmp_path):
    path = tmp_path / "points.csv"
    write_landmarks(path, np.array([[1.5, 2.0], [3.0, 4.25]]))
    np.testing.assert_array_equal(read_landmarks(path), [[1.5, 2.0], [3.0, 4.25]])
    assert read_text_file(path, "landmark file", limit=path.stat().st_size).read() == path.read_bytes().decode()


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: (p.symlink_to(p.with_name("b.csv")), p.with_name("b.csv").symlink_to(p)), "symbolic link loop"),
        (lambda p: p.symlink_to(p.with_name("gone.csv")), "symbolic link to a missing file"),
        (lambda p: p.symlink_to(p.parent), "is a directory, not a file"),
    ],
    ids=["loop", "dangling", "to-a-folder"],
)
def test_symbolic_links_say_what_they_lead_to(tmp_path, make, problem):
    path = tmp_path / "a.csv"
    make(path)
    assert _refusal(read_landmarks, path).problem.startswith(problem)


def test_os_errors_name_the_file(tmp_path):
    (tmp_path / "points.csv").write_text(",X,Y\n0,1,2\n")
    path = tmp_path / "points.csv" / "inside.csv"  # a file used as a folder: ENOTDIR, not "not found"
    error = _refusal(read_landmarks, path)
    assert str(error) == f"{path}: cannot be accessed (Not a directory)"
