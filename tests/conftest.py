pytest_plugins = ["tests.backends"]
