"""The app's tools through a real MCP client (the ``mcp`` package) against the launched app (tiny model)."""
import asyncio
import json

import pytest
from gradio_client import Client

from abu_explorer.attribution import names

TOOLS = {"generate_image", "attribute_image", "compare_methods"}


async def _session(url: str, work):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(url.rstrip("/") + "/gradio_api/mcp/") as (read, write, _), \
            ClientSession(read, write) as session:
        await session.initialize()
        return await work(session)


def _mcp(url, work):
    return asyncio.run(_session(url, work))


def _text(result) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def test_tools_are_listed_with_typed_documented_parameters(tiny_server):
    tools = _mcp(tiny_server, lambda s: s.list_tools())
    by_name = {t.name: t for t in tools.tools}
    assert set(by_name) == TOOLS  # the page's own events are callable but not offered as tools
    attr = by_name["attribute_image"]
    props = attr.inputSchema["properties"]
    assert {"prompt", "seed", "method", "k", "mode", "box"} <= set(props)
    assert props["k"]["type"] == "integer" and props["prompt"]["type"] == "string"
    assert "training images" in attr.description  # the docstring, and each argument's line in its schema
    assert "Attribution by Unlearning" in props["method"]["description"] and "pixels" in props["box"]["description"]


def test_attribute_through_mcp_matches_the_app(tiny_server, tiny_app):
    async def call(session):
        tools = await session.list_tools()
        name = next(t.name for t in tools.tools if t.name.endswith("attribute_image"))
        return await session.call_tool(name, {"prompt": "red apple", "seed": 3, "method": "pixel", "k": 5,
                                              "steps": 4, "box": "0,0,16,20"})

    result = _mcp(tiny_server, call)
    assert not result.isError, _text(result)
    out = json.loads(_text(result))
    query = tiny_app.query({"type": "generated", "prompt": "red apple", "seed": 3, "steps": 4, "guidance": 3.0},
                           (0, 0, 16, 20))
    direct = tiny_app.attribute(query, "pixel", 5)
    assert [r["index"] for r in out["results"]] == [r["index"] for r in direct["results"]]
    assert out["model"]["unet_hash"] == tiny_app.explorer.component_hash("unet")


def test_tools_answer_bad_input_in_one_line(tiny_server):
    client = Client(tiny_server, verbose=False)
    with pytest.raises(Exception, match="unknown method 'dino'"):
        client.predict("red apple", 0, 5, "abu,dino", "", 4, 3.0, api_name="/compare_methods")
    out = json.loads(client.predict("red apple", 0, 3, "pixel,clip", "", 4, 3.0, api_name="/compare_methods"))
    assert set(out["rankings"]) == {"pixel", "clip"} and 0 <= out["overlap_at_k"]["pixel|clip"] <= 1
    assert set(names()) >= set(out["rankings"])
