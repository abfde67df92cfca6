-- ds4.lua: Neovim client for `ds4-agent lsp` (Neovim 0.7 and later).
--
--   local ds4 = dofile("/path/to/examples/nvim/ds4.lua")
--   ds4.setup({ model = "/path/to/checkpoint" })
--   -- or: ds4.setup({ endpoint = "http://localhost:8000/v1", modelName = "ds4" })
--
-- Neovim 0.11+: registered with vim.lsp.config("ds4", ...) + vim.lsp.enable("ds4").
-- Neovim 0.7-0.10: started with vim.lsp.start_client and attached with
-- vim.lsp.buf_attach_client from a FileType/BufEnter autocmd, one client per root.
--
-- User commands: :Ds4Fix {issue}, :Ds4Explain (range), :Ds4Ask {question}, :Ds4Reindex.

local M = {}

local uv = vim.uv or vim.loop
local has_011 = vim.fn.has("nvim-0.11") == 1

-- Keys the server reads from initializationOptions (and the `ds4` settings section).
local SETTING_KEYS = { "model", "endpoint", "modelName", "apiKey", "budget", "testCommand" }

M.config = {
  cmd = { "ds4-agent", "lsp" },
  model = nil, -- path of a local checkpoint folder (engine runs in the server process)
  endpoint = nil, -- URL of an OpenAI-compatible server (alternative to model)
  modelName = nil, -- model name for endpoint
  apiKey = nil, -- API key for endpoint
  budget = nil, -- prompt tokens to pack (server default 32000)
  testCommand = nil, -- e.g. "python -m pytest -q"
}

local function notify(msg, level)
  vim.notify("ds4: " .. msg, level or vim.log.levels.INFO)
end

local function init_options()
  local out = {}
  for _, key in ipairs(SETTING_KEYS) do
    local value = M.config[key]
    if value ~= nil and value ~= "" then
      out[key] = value
    end
  end
  return out
end

-- The directory containing .git, searched upward from the buffer; else the cwd.
local function find_root(bufnr)
  local name = vim.api.nvim_buf_get_name(bufnr)
  if name == "" then
    return vim.fn.getcwd()
  end
  local dir = vim.fn.fnamemodify(name, ":p:h")
  while dir and dir ~= "" do
    if uv.fs_stat(dir .. "/.git") then
      return dir
    end
    local parent = vim.fn.fnamemodify(dir, ":h")
    if parent == dir then
      break
    end
    dir = parent
  end
  return vim.fn.getcwd()
end

-- Only real files: a normal buffer with a name that is not some scheme://.
local function is_file_buffer(bufnr)
  if not vim.api.nvim_buf_is_valid(bufnr) or not vim.api.nvim_buf_is_loaded(bufnr) then
    return false
  end
  if vim.bo[bufnr].buftype ~= "" then
    return false
  end
  local name = vim.api.nvim_buf_get_name(bufnr)
  return name ~= "" and not name:match("^%a[%w+.-]*://")
end

---------------------------------------------------------------------------
-- Neovim 0.7-0.10: start_client + buf_attach_client, one client per root.
---------------------------------------------------------------------------

local clients_by_root = {}

local function legacy_attach(bufnr)
  if not is_file_buffer(bufnr) then
    return
  end
  local root = find_root(bufnr)
  local id = clients_by_root[root]
  if not (id and vim.lsp.get_client_by_id(id)) then
    local opts = init_options()
    id = vim.lsp.start_client({
      name = "ds4",
      cmd = M.config.cmd,
      root_dir = root,
      workspace_folders = { { uri = vim.uri_from_fname(root), name = root } },
      init_options = opts,
      settings = { ds4 = opts },
      on_exit = function(_, _, client_id)
        if clients_by_root[root] == client_id then
          clients_by_root[root] = nil
        end
      end,
    })
    if not id then
      notify("could not start " .. table.concat(M.config.cmd, " "), vim.log.levels.ERROR)
      return
    end
    clients_by_root[root] = id
  end
  if not vim.lsp.buf_is_attached(bufnr, id) then
    vim.lsp.buf_attach_client(bufnr, id)
  end
end

---------------------------------------------------------------------------
-- Requests
---------------------------------------------------------------------------

local function all_ds4_clients()
  if vim.lsp.get_clients then -- 0.10+
    return vim.lsp.get_clients({ name = "ds4" })
  end
  local out = {}
  for _, client in pairs(vim.lsp.get_active_clients()) do
    if client.name == "ds4" then
      table.insert(out, client)
    end
  end
  return out
end

-- The ds4 client attached to bufnr, else any running ds4 client.
local function get_client(bufnr)
  local clients = all_ds4_clients()
  for _, client in ipairs(clients) do
    if vim.lsp.buf_is_attached(bufnr, client.id) then
      return client
    end
  end
  return clients[1]
end

-- workspace/executeCommand with one argument object (or none).
local function execute(command, arg, on_result)
  local bufnr = vim.api.nvim_get_current_buf()
  local client = get_client(bufnr)
  if not client then
    notify("no ds4 language server is running (open a file first)", vim.log.levels.WARN)
    return
  end
  local params = { command = command, arguments = arg and { arg } or {} }
  local handler = function(err, result)
    if err then
      notify(command .. " failed: " .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
      return
    end
    on_result(result)
  end
  if has_011 then
    client:request("workspace/executeCommand", params, handler, bufnr)
  else
    client.request("workspace/executeCommand", params, handler, bufnr)
  end
end

-- Show text in a new scratch split.
local function show_scratch(text, filetype)
  vim.cmd("botright new")
  local buf = vim.api.nvim_get_current_buf()
  vim.bo[buf].buftype = "nofile"
  vim.bo[buf].bufhidden = "wipe"
  vim.bo[buf].swapfile = false
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, vim.split(text or "", "\n", { plain = true }))
  vim.bo[buf].modifiable = false
  vim.bo[buf].filetype = filetype or "markdown"
end

-- LSP range for the command's line range (whole lines), or nil without one.
local function command_range(opts)
  if not opts.range or opts.range == 0 then
    return nil
  end
  return {
    start = { line = opts.line1 - 1, character = 0 },
    ["end"] = { line = opts.line2, character = 0 },
  }
end

local function cmd_fix(opts)
  local arg = { issue = opts.args }
  local bufnr = vim.api.nvim_get_current_buf()
  if is_file_buffer(bufnr) then
    arg.uri = vim.uri_from_bufnr(bufnr)
    arg.range = command_range(opts)
  end
  notify("fixing…")
  -- The server applies the edit with workspace/applyEdit; Neovim handles it.
  execute("ds4.fix", arg, function(result)
    result = result or {}
    local status = tostring(result.status or "done")
    notify("fix " .. status .. (result.applied and " (edit applied)" or ""))
    if not result.applied and type(result.diff) == "string" and result.diff ~= "" then
      show_scratch(result.diff, "diff")
    end
  end)
end

local function cmd_explain(opts)
  local bufnr = vim.api.nvim_get_current_buf()
  if not is_file_buffer(bufnr) then
    notify("open a file to explain", vim.log.levels.WARN)
    return
  end
  local range = command_range(opts)
  if not range then
    local line = vim.api.nvim_win_get_cursor(0)[1] - 1
    range = { start = { line = line, character = 0 }, ["end"] = { line = line + 1, character = 0 } }
  end
  execute("ds4.explain", { uri = vim.uri_from_bufnr(bufnr), range = range }, function(result)
    show_scratch((result and result.markdown) or "_(no explanation)_", "markdown")
  end)
end

local function cmd_ask(opts)
  local question = opts.args
  execute("ds4.ask", { question = question }, function(result)
    result = result or {}
    local text = "# " .. question .. "\n\n" .. tostring(result.answer or "_(no answer)_")
    local refs = result.references or {}
    if #refs > 0 then
      local items = {}
      text = text .. "\n\n## References\n"
      for _, ref in ipairs(refs) do
        local fname = vim.uri_to_fname(ref.uri)
        local lnum = ref.range and ref.range.start.line + 1 or 1
        local col = ref.range and ref.range.start.character + 1 or 1
        text = text .. "\n- " .. vim.fn.fnamemodify(fname, ":.") .. ":" .. lnum
        table.insert(items, { filename = fname, lnum = lnum, col = col, text = question })
      end
      vim.fn.setqflist({}, " ", { title = "ds4: " .. question, items = items })
      text = text .. "\n\n(references are also in the quickfix list: :copen)"
    end
    show_scratch(text, "markdown")
  end)
end

local function cmd_reindex()
  execute("ds4.reindex", nil, function(report)
    notify("re-indexed: " .. vim.inspect(report, { newline = " ", indent = "" }))
  end)
end

---------------------------------------------------------------------------
-- Setup
---------------------------------------------------------------------------

function M.setup(opts)
  M.config = vim.tbl_extend("force", M.config, opts or {})

  -- Running clients get the new settings through didChangeConfiguration.
  for _, client in ipairs(all_ds4_clients()) do
    local params = { settings = { ds4 = init_options() } }
    if has_011 then
      client:notify("workspace/didChangeConfiguration", params)
    else
      client.notify("workspace/didChangeConfiguration", params)
    end
  end

  if has_011 then
    vim.lsp.config("ds4", {
      cmd = M.config.cmd,
      -- no `filetypes`: attach to every file buffer
      root_dir = function(bufnr, on_dir)
        on_dir(find_root(bufnr))
      end,
      init_options = init_options(),
      settings = { ds4 = init_options() },
    })
    vim.lsp.enable("ds4")
  else
    local group = vim.api.nvim_create_augroup("ds4_lsp", { clear = true })
    vim.api.nvim_create_autocmd({ "FileType", "BufEnter" }, {
      group = group,
      callback = function(args)
        legacy_attach(args.buf)
      end,
    })
    legacy_attach(vim.api.nvim_get_current_buf())
  end

  vim.api.nvim_create_user_command("Ds4Fix", cmd_fix, { nargs = "+", range = true, desc = "ds4: fix an issue" })
  vim.api.nvim_create_user_command("Ds4Explain", cmd_explain, { range = true, desc = "ds4: explain the lines" })
  vim.api.nvim_create_user_command("Ds4Ask", cmd_ask, { nargs = "+", desc = "ds4: ask about the repository" })
  vim.api.nvim_create_user_command("Ds4Reindex", cmd_reindex, { nargs = 0, desc = "ds4: re-index the workspace" })
  return M
end

return M
