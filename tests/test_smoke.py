from dataspace_client import DataBlock, Header


def test_put_and_get_roundtrip(dataspace):
    block = DataBlock(dataspace, "smoke")
    block.put("k", {"a": 1}, Header(block.taskmanager_id))
    assert block["k"] == {"a": 1}
