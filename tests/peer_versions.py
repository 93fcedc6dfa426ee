"""The peer versions whose deviations the chapters show.

A test that asserts a peer's known deviation from the paper runs that assert only while the installed peer is the
version the deviation was measured with (`peer_is`): a later peer release that fixes it then does not fail the test,
whose asserts about optim_lab (against the paper / a float64 transcription) still run."""
from importlib.metadata import PackageNotFoundError, version

MEASURED = {'pytorch_optimizer': '4.1.0', 'torchzero': '0.4.4'}


def peer_is(package: str) -> bool:
    "True while the installed peer is MEASURED[package], the version whose deviation the chapter shows"
    try:
        return version(package) == MEASURED[package]
    except PackageNotFoundError:
        return False
