"""A plugin that fails on import, to check kvframe reports it and keeps working."""

import kvframe_dependency_that_does_not_exist  # noqa: F401


def register():
    return None
