"""Read the `sentiment` topic with plain aiokafka + msgpack (no sentiment-stream install): one JSON line per post.

Delivery is at-least-once, so a post can arrive twice: de-duplicate by the record key (the post id).
Usage: python consume_sentiment.py [BOOTSTRAP] [TOPIC] [GROUP] [STOP_AFTER_IDLE_S]   (0 = run forever)
"""

import asyncio
import json
import sys

import msgpack
from aiokafka import AIOKafkaConsumer


async def main(bootstrap: str = "127.0.0.1:9092", topic: str = "sentiment", group: str = "sentiment-example",
               idle_s: str = "0") -> None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest")
    await consumer.start()
    seen: set[bytes] = set()  # post ids already handled (in production: a TTL cache or a keyed upsert)
    idle = 0.0
    try:
        while not float(idle_s) or idle < float(idle_s):
            batch = await consumer.getmany(timeout_ms=500)
            idle = 0.0 if batch else idle + 0.5
            for record in (r for records in batch.values() for r in records):
                headers = {k: v.decode() for k, v in record.headers}
                if record.key in seen or not headers.get("schema-version", "1.0").startswith("1."):
                    continue  # a redelivered duplicate, or a major version this reader does not know
                seen.add(record.key)
                event = msgpack.unpackb(record.value)  # a map; ignore fields you do not know
                print(json.dumps({"id": event["id"], "label": event["label"], "score": round(event["score"], 3),
                                  "model": headers.get("model-version")}), flush=True)
    finally:
        await consumer.stop()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
