"""Assertions on how kvq reports errors (DESIGN.md: one line, `kvq: error:`)."""


def assert_error(proc, status, *needles):
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvq: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
