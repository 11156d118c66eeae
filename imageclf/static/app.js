// The page of `imageclf serve`: each picked or dropped image is previewed and sent on its own
// to POST predict (the server batches concurrent requests), and its top 5 classes are drawn
// as bars.
"use strict";

const TOP_K = 5;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showBars(card, top) {
  const bars = element("ol", "bars");
  for (const { class: name, probability } of top) {
    const bar = element("li", "bar");
    const percent = (100 * probability).toFixed(1) + "%";
    bar.setAttribute("aria-label", `${name}: ${percent}`);
    const track = element("span", "track");
    const fill = element("span", "fill");
    fill.style.width = Math.max(0.5, 100 * probability) + "%";
    track.append(fill);
    bar.append(element("span", "label", name), track, element("span", "value", percent));
    bars.append(bar);
  }
  card.dataset.topClass = top[0].class;
  card.append(bars);
}

async function classify(file, results) {
  const card = element("article", "card");
  card.setAttribute("aria-busy", "true");
  const preview = element("img");
  preview.alt = file.name;
  preview.src = URL.createObjectURL(file);
  preview.onload = () => {
    URL.revokeObjectURL(preview.src);
    // a thumbnail-sized image (CIFAR-10 is 32 x 32) enlarged: sharp pixels, not a blur
    if (preview.naturalWidth < 128) preview.classList.add("small");
  };
  preview.onerror = () => {
    URL.revokeObjectURL(preview.src);
    preview.classList.add("unviewable");
  };
  const status = element("p", "file", `${file.name}: classifying…`);
  card.append(preview, status);
  results.prepend(card);

  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch(`predict?top_k=${TOP_K}`, { method: "POST", body: form });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    status.textContent = file.name;
    showBars(card, body.predictions[0].top);
  } catch (error) {
    status.textContent = file.name;
    card.append(element("p", "error", error.message));
    card.classList.add("failed");
  } finally {
    card.removeAttribute("aria-busy");
  }
}

async function classifyAll(files) {
  const results = document.getElementById("results");
  const status = document.getElementById("status");
  const images = Array.from(files);
  if (!images.length) return;
  status.textContent = `Classifying ${images.length} image${images.length > 1 ? "s" : ""}…`;
  await Promise.all(images.map((file) => classify(file, results)));
  status.textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => {
    classifyAll(input.files);
    input.value = "";  // picking the same file again classifies it again
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    classifyAll(event.dataTransfer.files);
  });
});
