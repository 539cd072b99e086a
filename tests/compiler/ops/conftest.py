"""Settings for the op tests."""


def pytest_configure(config):
    config.addinivalue_line("markers", "inductor: compiles with torch.compile + Inductor (a cold CPU compile takes tens of seconds)")
