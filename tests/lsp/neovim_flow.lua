-- Driven by tests/lsp/test_neovim.py: Neovim (0.7+, headless) runs ds4's language server with the
-- scripted backend, attaches it to calc.py, finds a symbol, runs ds4.fix, lets Neovim apply the
-- server's workspace/applyEdit to the buffer, writes the buffer, and records what happened.
local args = vim.fn.json_decode(vim.fn.readfile(vim.env.DS4_FLOW_ARGS)[1])
local out = { progress = {}, messages = {} }

local function finish(err)
  out.error = err
  vim.fn.writefile({ vim.fn.json_encode(out) }, args.out)
  vim.cmd("qa!")
end

local function flow()
  vim.cmd("edit " .. vim.fn.fnameescape(args.repo .. "/calc.py"))
  local bufnr = vim.api.nvim_get_current_buf()
  local indexed = false
  local client_id = vim.lsp.start_client({
    name = "ds4",
    cmd = args.cmd,
    cmd_cwd = args.cwd,
    root_dir = args.repo,
    workspace_folders = { { uri = vim.uri_from_fname(args.repo), name = "repo" } },
    init_options = { budget = 4000, testCommand = args.test_command },
    handlers = {
      ["$/progress"] = function(_, result)
        table.insert(out.progress, result.value.kind)
        if result.value.kind == "end" then
          indexed = true
        end
      end,
      ["window/showMessage"] = function(_, result)
        table.insert(out.messages, result.message)
      end,
    },
  })
  assert(client_id, "the server did not start")
  vim.lsp.buf_attach_client(bufnr, client_id)
  assert(vim.wait(60000, function() return indexed end, 50), "no end of indexing progress")
  local client = vim.lsp.get_client_by_id(client_id)

  local found = client.request_sync("workspace/symbol", { query = "mul" }, 30000, bufnr)
  assert(found and found.result, "workspace/symbol: " .. vim.inspect(found))
  out.symbols = {}
  for _, s in ipairs(found.result) do
    table.insert(out.symbols, { name = s.name, uri = s.location.uri, line = s.location.range.start.line })
  end

  local fix = client.request_sync("workspace/executeCommand", {
    command = "ds4.fix",
    arguments = { { issue = args.issue, uri = vim.uri_from_bufnr(bufnr) } },
  }, 180000, bufnr)
  assert(fix and fix.result, "ds4.fix: " .. vim.inspect(fix))
  out.fix = { status = fix.result.status, applied = fix.result.applied, diff = fix.result.diff }
  vim.wait(1000, function() return false end) -- let the edit's buffer events settle
  out.buffer = table.concat(vim.api.nvim_buf_get_lines(bufnr, 0, -1, false), "\n")
  vim.api.nvim_buf_call(bufnr, function() vim.cmd("write") end)

  client.stop()
  vim.wait(10000, function() return client.is_stopped() end, 50)
end

local ok, err = pcall(flow)
finish(ok and vim.NIL or tostring(err))
