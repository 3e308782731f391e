"""Constants shared by the tools tests (a unique module name: ``conftest`` is ambiguous when
several test folders run in one session)."""

PROJECT = 7
IMAGE_SIZE = 32
