import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # the recurrent layers' many small ops run far slower with 2 intra-op threads on the 2-core CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
