pytest_plugins = ["tests.backends", "tests.daemon", "tests.mail", "tests.imapfix"]
