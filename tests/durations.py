"""Write tests/durations.json (seconds per test file) from JUnit XML reports of a full run
(one, or several that together cover the suite, e.g. `-m "not slow"` and `-m slow`):

    python -m pytest -q -n 2 --dist loadfile --junitxml=/tmp/junit.xml
    python tests/durations.py /tmp/junit.xml

conftest.py orders the files longest first with it, so the two workers end together."""

import collections
import json
import os
import sys
import xml.etree.ElementTree as ET


def per_file(*junit_xml: str) -> dict[str, float]:
    seconds = collections.Counter()
    for report in junit_xml:
        for case in ET.parse(report).iter("testcase"):
            path = case.get("classname", "").split(".")  # tests.test_foo[.Class]
            seconds[f"{path[0]}/{path[1]}.py"] += float(case.get("time", 0))
    return {name: round(s, 1) for name, s in seconds.most_common()}


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
    with open(out, "w") as f:
        json.dump(per_file(*sys.argv[1:]), f, indent=1)
        f.write("\n")
