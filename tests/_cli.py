"""Helpers of the command-line tests: run ``peftjax`` in-process, and expect a one-line error."""

from peftjax import cli


def run(capsys, *argv):
  """``peftjax *argv`` in this process: ``(exit code, stdout, stderr)``."""
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def one_error(capsys, *argv) -> str:
  """The one line ``peftjax *argv`` prints on stderr when it exits with 2 (a usage error)."""
  rc, out, err = run(capsys, *argv)
  assert rc == 2, (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]
