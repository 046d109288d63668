"""The Sandboxfile parser: the Dockerfile subset, and clear errors naming the line."""

from __future__ import annotations

import pytest

from sandbox.images import recipe
from sandbox.images.recipe import RecipeError

RECIPE = """\
# a comment
ARG SUITE=bookworm
FROM --variant=minbase debian:${SUITE}

RUN apt-get update && \\
    # a comment inside a continuation is dropped
    apt-get install -y python3
RUN ["/bin/sh", "-c", "echo exec form"]
COPY --chmod=755 a.sh b.sh /opt/
ADD files.tar /srv
ENV A=1 B="two words"
WORKDIR /work
USER 1000:1000
LABEL org.example=yes
ENTRYPOINT ["python3"]
CMD python3 -V
"""


def test_parses_the_supported_subset() -> None:
    ins = recipe.parse(RECIPE)
    assert [i.keyword for i in ins] == ["ARG", "FROM", "RUN", "RUN", "COPY", "ADD", "ENV",
                                        "WORKDIR", "USER", "LABEL", "ENTRYPOINT", "CMD"]
    assert [i.line for i in ins] == [2, 3, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert ins[1].flags == {"variant": "minbase"} and ins[1].text == "debian:${SUITE}"
    assert ins[2].text == "apt-get update && apt-get install -y python3"
    assert ins[3].exec_form == ["/bin/sh", "-c", "echo exec form"]
    assert ins[4].flags == {"chmod": "755"} and ins[4].text == "a.sh b.sh /opt/"
    assert ins[10].exec_form == ["python3"] and ins[11].exec_form is None


@pytest.mark.parametrize(("text", "line", "message"), [
    ("FROM scratch\nEXPOSE 80\n", 2, "unsupported instruction 'EXPOSE'"),
    ("FROM scratch\n\n# x\nHEALTHCHECK NONE\n", 4, "unsupported instruction 'HEALTHCHECK'"),
    ("FROM scratch\nONBUILD RUN x\n", 2, "unsupported instruction 'ONBUILD'"),
    ("RUN true\n", 1, "must start with FROM"),
    ("", 1, "must start with FROM"),
    ("FROM scratch\nCOPY --from=build /a /b\n", 2, "COPY --from is not supported (multi-stage"),
    ("FROM scratch\nCOPY --chown=1:1 a /b\n", 2, "layers do not keep file ownership"),
    ("FROM scratch\nRUN --mount=type=cache,target=/x true\n", 2, "RUN --mount is not supp"),
    ("FROM scratch\nRUN --network=bridge true\n", 2, "expected one of default, none, host"),
    ("FROM scratch\nCOPY --chmod=rwx a /b\n", 2, "expected an octal mode"),
    ("FROM scratch\nENV --x=1 A=1\n", 2, "ENV --x is not supported"),
    ("FROM scratch\nRUN [\"unterminated\n", 2, "malformed JSON array"),
    ("FROM scratch\nRUN\n", 2, "RUN needs arguments"),
])
def test_errors_name_the_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.parse(text, "ctx/Sandboxfile")
    assert str(info.value).startswith(f"ctx/Sandboxfile:{line}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_key_values_and_substitution() -> None:
    assert recipe.parse_key_values('A=1 B="two words" C=', "f", 1, "ENV") == {
        "A": "1", "B": "two words", "C": ""}
    assert recipe.parse_key_values("NAME some value", "f", 1, "ENV") == {"NAME": "some value"}
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        recipe.parse_key_values("A=1 junk", "f", 3, "ENV")
    assert recipe.substitute("$A-${B}-${C:-dflt}-$MISSING.", {"A": "a", "B": "b"}) == "a-b-dflt-."
