// Unmodified automerge-repo clients using two Cairn agents as their sync servers.
//
//   node repo_interop.mjs <ws url of agent A> <ws url of agent B> <http url of agent B>
//
// Client 1 (on A) creates and edits a document; client 2 (on B) finds it once B has it and
// sees the edit; each then sees the other's edit; concurrent edits on both converge; client 3
// (also on A) receives client 1's ephemeral broadcast, then edits, and every client converges;
// no client is ever disconnected. Prints one JSON line with what the clients ended with, for
// the Rust test to compare with the agents' HTTP API. Exits non-zero with a message on stderr
// if any step fails or times out.

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as Automerge from "@automerge/automerge"

const STEP_TIMEOUT_MS = 60_000
const TOTAL_TIMEOUT_MS = 150_000

const [wsA, wsB, httpB] = process.argv.slice(2)
if (!wsA || !wsB || !httpB) {
  console.error("usage: repo_interop.mjs <ws url A> <ws url B> <http url B>")
  process.exit(64)
}

setTimeout(() => {
  console.error(`interop scenario did not finish within ${TOTAL_TIMEOUT_MS} ms`)
  process.exit(3)
}, TOTAL_TIMEOUT_MS).unref()

/** Polls `check` until it returns something truthy; fails naming `what` after the timeout. */
async function until(what, check) {
  const deadline = Date.now() + STEP_TIMEOUT_MS
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 25))
  }
}

/** Servers that dropped a client; an unmodified client must never be disconnected. */
const disconnects = []
const clientOn = url => {
  const repo = new Repo({ network: [new WebSocketClientAdapter(url, 1000)] })
  repo.networkSubsystem.on("peer-disconnected", ({ peerId }) => disconnects.push({ url, peerId }))
  return repo
}
const items = handle => handle.doc()?.items ?? []
const heads = handle => Automerge.getHeads(handle.doc()).slice().sort()
const sameHeads = (a, b) => JSON.stringify(heads(a)) === JSON.stringify(heads(b))

async function agentHas(httpBase, documentId, item) {
  const response = await fetch(`${httpBase}/v1/docs/${documentId}`)
  if (response.status !== 200) return false
  const body = await response.json()
  return (body.doc?.items ?? []).includes(item)
}

async function scenario() {
  const client1 = clientOn(wsA)
  const client2 = clientOn(wsB)
  const client3 = clientOn(wsA)

  const handle1 = client1.create({ title: "hello", items: [] })
  handle1.change(doc => {
    doc.items.push("from-1")
  })
  // B answers `doc-unavailable` until the hub brought it the document, so ask once it has.
  await until("agent B to hold client 1's document", () =>
    agentHas(httpB, handle1.documentId, "from-1"),
  )

  const handle2 = await client2.find(handle1.url)
  await until("client 2 to see client 1's edit", () => items(handle2).includes("from-1"))

  handle2.change(doc => {
    doc.items.push("from-2")
  })
  await until("client 1 to see client 2's edit", () => items(handle1).includes("from-2"))

  handle1.change(doc => {
    doc.items.push("concurrent-1")
    doc.one = 1
  })
  handle2.change(doc => {
    doc.items.push("concurrent-2")
    doc.two = 2
  })
  await until("concurrent edits to converge", () => {
    const seen = ["concurrent-1", "concurrent-2"]
    return (
      seen.every(i => items(handle1).includes(i) && items(handle2).includes(i)) &&
      sameHeads(handle1, handle2)
    )
  })

  const handle3 = await client3.find(handle1.url)
  let ephemeral = null
  handle3.on("ephemeral-message", ({ message, senderId }) => {
    ephemeral ??= { message, fromClient1: senderId === client1.peerId }
  })
  // Ephemeral messages are best effort: repeat until one arrives.
  let cursor = 0
  await until("client 3 to receive client 1's ephemeral message", () => {
    handle1.broadcast({ cursor: ++cursor })
    return ephemeral
  })

  // Client 3 edits too, so a socket the ephemeral traffic broke would show as a disconnect.
  handle3.change(doc => {
    doc.items.push("from-3")
  })
  await until("every client to see client 3's edit", () =>
    [handle1, handle2, handle3].every(
      h => items(h).includes("from-3") && sameHeads(h, handle3),
    ),
  )

  const result = {
    documentId: handle1.documentId,
    url: handle1.url,
    heads1: heads(handle1),
    heads2: heads(handle2),
    doc1: JSON.parse(JSON.stringify(handle1.doc())),
    doc2: JSON.parse(JSON.stringify(handle2.doc())),
    ephemeral,
    disconnects: [...disconnects],
  }
  await Promise.all([client1, client2, client3].map(client => client.shutdown()))
  return result
}

scenario().then(
  result => {
    console.log(JSON.stringify(result))
    process.exit(0)
  },
  error => {
    console.error(`interop scenario failed: ${error?.stack ?? error}`)
    process.exit(1)
  },
)
