// Search by image: a dropped or chosen picture goes to POST /ui/search with the form's filters; the server answers
// the grid as HTML, put in place here. Everything else is plain links and forms.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("search");
  if (!form) return;
  const drop = document.getElementById("drop");
  const input = document.getElementById("image");
  const status = document.getElementById("status");
  const results = document.getElementById("results");
  let picked = null;

  function filters() {
    const params = new URLSearchParams();
    for (const [name, value] of new FormData(form)) {
      if (name !== "image" && name !== "post_id" && typeof value === "string" && value) params.set(name, value);
    }
    return params;
  }

  function show(message, isError) {
    status.textContent = message;
    status.classList.toggle("error", Boolean(isError));
  }

  async function search(file) {
    picked = file;
    const preview = drop.querySelector("img.preview") || document.createElement("img");
    preview.className = "preview";
    preview.alt = "your picture";
    preview.src = URL.createObjectURL(file);
    drop.prepend(preview);
    show("Searching…");
    const body = new FormData();
    body.append("image", file, file.name || "upload");
    try {
      const response = await fetch("/ui/search?" + filters(), { method: "POST", body });
      if (!response.ok) {
        let reason = response.statusText;
        try { reason = (await response.json()).error || reason; } catch (_) { /* not JSON */ }
        show(`The picture was not searched: ${reason}`, true);
        return;
      }
      results.innerHTML = await response.text();
      show("");
    } catch (err) {
      show(`The server did not answer: ${err}`, true);
    }
  }

  input.addEventListener("change", () => { if (input.files.length) search(input.files[0]); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) search(file);
  });
  form.addEventListener("submit", (event) => {
    // with a post id, the page itself searches (a plain GET); with a picture, search it again with the new filters
    if (picked && !form.elements.post_id.value) {
      event.preventDefault();
      search(picked);
    }
  });
});
